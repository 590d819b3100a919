"""The multi-identity speech corpus behind the priors (issue 19): media traced to public git blobs.

    python -m bench.corpus extract --mirrors /work/.mirror      # media/ from repository snapshots
    python -m bench.corpus check                                 # every file's sha256 against the manifest
    python -m bench.corpus preprocess                            # media/ -> clips/<id>/, one at a time
    python -m bench.corpus totals                                # speech minutes and identities
    python -m bench.corpus table                                 # rewrite priors/corpus.md from the YAML

`priors/corpus.yaml` is the manifest (one row per clip: repo@commit:path, sha256, the person in it);
`priors/corpus.md` is its human table, written from it. The media are third-party footage of real
people: they live in a git-ignored folder (default `.devdata/corpus/`), never in the repository.
A mirror is a git directory `<mirrors>/<owner>+<name>/repo` (or `repo/.git`: what the search tool's
fetch brings); `extract` takes the blob at `commit:path` and refuses one whose sha256 differs.
`preprocess` runs `ggtalker preprocess --person PERSON` per clip in its own process, so one bad
video is reported and skipped and the batch goes on; finished clips are skipped on a re-run
(resumable), and a finished clip made before `--person` existed gets the manifest's person written
into its meta.yaml (fit-prior treats one person's clips as one identity).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ggtalker_cli.artifacts import write_meta

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "priors" / "corpus.yaml"
DATA = Path(os.environ.get("GGTALKER_CORPUS", ROOT / ".devdata" / "corpus"))


def load(manifest: Path = MANIFEST) -> list[dict]:
    clips = yaml.safe_load(manifest.read_text())["clips"]
    ids = [c["id"] for c in clips]
    dup = {i for i in ids if ids.count(i) > 1} | {c["sha256"] for c in clips if [d["sha256"] for d in clips].count(c["sha256"]) > 1}
    if dup:
        raise SystemExit(f"error: {manifest}: duplicate ids or sha256 {sorted(dup)}: each clip must be listed once")
    return clips


def media_path(clip: dict, data: Path = DATA) -> Path:
    return data / "media" / f"{clip['id']}{Path(clip['path']).suffix.lower()}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(clips: list[dict], mirrors: Path, data: Path = DATA) -> int:
    """Write each clip's blob from its mirror; a missing mirror or a wrong hash is named, not written."""
    bad = 0
    for c in clips:
        dest = media_path(c, data)
        if dest.exists() and sha256(dest) == c["sha256"]:
            continue
        git_dir = mirrors / c["repo"].replace("/", "+") / "repo"
        if (git_dir / ".git").is_dir():  # some snapshots arrive as a work tree
            git_dir = git_dir / ".git"
        run = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{c['commit']}:{c['path']}"], check=False, capture_output=True)
        if run.returncode != 0:
            print(f"error: {c['id']}: {c['repo']}@{c['commit']}:{c['path']} not readable from {git_dir}: {run.stderr.decode().strip()}")
            bad += 1
            continue
        if hashlib.sha256(run.stdout).hexdigest() != c["sha256"]:
            print(f"error: {c['id']}: blob {c['repo']}@{c['commit']}:{c['path']} does not match the manifest sha256; not written")
            bad += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(run.stdout)
        tmp.replace(dest)
    return bad


def check(clips: list[dict], data: Path = DATA) -> list[str]:
    """Ids whose media file is missing or differs from the manifest."""
    bad = []
    for c in clips:
        f = media_path(c, data)
        if not f.exists():
            bad.append(f"{c['id']}: {f} missing")
        elif sha256(f) != c["sha256"]:
            bad.append(f"{c['id']}: {f} sha256 {sha256(f)} != manifest {c['sha256']}")
    return bad


def _summary(rows: list[dict]) -> str:
    lines = ["| clip | frames | tracked % | faces | seconds | failure |", "|---|---|---|---|---|---|"]
    for r in rows:
        tracked = "" if r["tracked"] is None else f"{100 * r['tracked']:.0f}"
        lines.append(f"| {r['clip']} | {r['frames'] or ''} | {tracked} | {r['faces'] or ''} | {r['seconds'] or ''} | {r['failure'] or ''} |")
    return "\n".join(lines) + "\n"


def _subprocess(video: Path, dest: Path, size: int, person: str, log: Path) -> str | None:
    """`ggtalker preprocess` in its own process (one bad video cannot end the batch); the
    failure's line from its log, or None."""
    cmd = [sys.executable, "-m", "ggtalker_cli.cli", "preprocess", str(video), "-o", str(dest), "--size", str(size), "--person", person]
    if dest.exists():
        cmd.append("--resume")  # a folder left by an interrupted run of this batch
    with log.open("w") as out:
        run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if run.returncode == 0:
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    return (errors or lines or [f"exit status {run.returncode}"])[-1][:200]


def _in_process(video: Path, dest: Path, size: int, person: str, log: Path) -> str | None:
    """`ggtalker preprocess` in this process (models stay loaded: ~3 s a clip less than a fresh
    process, most of a 3-s GRID clip's cost); the failure's line, or None."""
    from ggtalker_cli import console
    from ggtalker_cli.config import load_config
    from ggtalker_cli.errors import GGError
    from ggtalker_cli.stages import preprocess as stage

    console.configure(quiet=True, json_mode=False)
    try:
        stage.run(video, dest, load_config(None, {"preprocess": {"size": size}}), resume=dest.exists(), person=person)
    except GGError as e:
        log.write_text(f"error: {e}\n")
        return f"error: {e}"[:200]
    return None


def preprocess(clips: list[dict], data: Path = DATA, size: int = 256, in_process: bool = False) -> list[dict]:
    """Preprocess every clip not done yet; one row per clip (frames, tracked share, faces, seconds, failure).

    The summary table (`preprocess_summary.md`) is rewritten after every clip, so an interrupted
    batch still says how far it got. `in_process`: one process for the batch (faster for many
    short clips; a GGError still skips just that clip, a crash ends the batch, which resumes).
    """
    out = data / "clips"
    logs = data / "logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(clips):
        dest = out / c["id"]
        row = {"clip": c["id"], "frames": None, "tracked": None, "faces": None, "seconds": None, "failure": None}
        if not (dest / "meta.yaml").exists():
            print(f"[{i + 1}/{len(clips)}] {c['id']}", flush=True)
            t0 = time.monotonic()
            run = _in_process if in_process else _subprocess
            row["failure"] = run(media_path(c, data), dest, size, c["person"], logs / f"{c['id']}.log")
            row["seconds"] = round(time.monotonic() - t0, 1)
        if (dest / "meta.yaml").exists():
            meta = yaml.safe_load((dest / "meta.yaml").read_text())
            if meta.get("person") != c["person"]:  # made by this batch before preprocess took --person
                meta["person"] = c["person"]
                write_meta(dest, "clip", {k: v for k, v in meta.items() if k not in ("format", "version")})
            row["frames"] = int(meta["n_frames"])
            row["tracked"] = float(meta["tracking"]["tracked_fraction"])
            row["faces"] = meta["tracking"].get("faces_seen")
            row["seconds"] = row["seconds"] or round(sum(meta.get("timings_s", {}).values()), 1)
        rows.append(row)
        (data / "preprocess_summary.md").write_text(_summary(rows))
    return rows


def totals(clips: list[dict], data: Path = DATA) -> dict:
    """Speech seconds and distinct people over the clips that preprocessed (durations from meta.yaml)."""
    seconds, people, done = 0.0, set(), []
    for c in clips:
        meta_file = data / "clips" / c["id"] / "meta.yaml"
        if meta_file.exists():
            meta = yaml.safe_load(meta_file.read_text())
            seconds += int(meta["n_frames"]) / float(meta["fps"])
            people.add(c["person"])
            done.append(c["id"])
    return {"clips": len(done), "identities": len(people), "speech_minutes": round(seconds / 60, 2),
            "manifest_clips": len(clips), "manifest_identities": len({c["person"] for c in clips})}


def table(clips: list[dict]) -> str:
    head = ["| id | identity / look | lang | source (repo@commit:path) | sha256 | bytes | dur (s) | fps | res | repo licence | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [f"| {c['id']} | {c['identity']} | {c['language']} | {c['repo']}@{c['commit']}:{c['path']} | {c['sha256']} | {c['bytes']} "
            f"| {c['duration']} | {c['fps']} | {c['res']} | {c['licence']} | {c['notes']} |" for c in clips]
    return "\n".join(head + rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("verb", choices=["extract", "check", "preprocess", "totals", "table"])
    ap.add_argument("ids", nargs="*", help="only these clip ids (default: all)")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding media/ and clips/ (git-ignored)")
    ap.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"), help="folder of <owner>+<name>/repo bare git dirs")
    ap.add_argument("--size", type=int, default=256, help="preprocess crop side")
    ap.add_argument("--in-process", action="store_true", help="preprocess in this process (faster for many short clips)")
    a = ap.parse_args(argv)
    clips = load(a.manifest)
    if a.ids:
        unknown = set(a.ids) - {c["id"] for c in clips}
        if unknown:
            raise SystemExit(f"error: {sorted(unknown)} not in {a.manifest}")
        clips = [c for c in clips if c["id"] in a.ids]
    if a.verb == "extract":
        return 1 if extract(clips, a.mirrors, a.data) else 0
    if a.verb == "check":
        bad = check(clips, a.data)
        for b in bad:
            print(f"error: {b}")
        print(f"{len(clips) - len(bad)}/{len(clips)} files match {a.manifest.name}")
        return 1 if bad else 0
    if a.verb == "preprocess":
        rows = preprocess(clips, a.data, a.size, a.in_process)
        failed = [r for r in rows if r["failure"]]
        print(f"{len(rows) - len(failed)}/{len(rows)} clips preprocessed; summary: {a.data / 'preprocess_summary.md'}")
        for r in failed:
            print(f"failed: {r['clip']}: {r['failure']}")
        return 0
    if a.verb == "totals":
        print(yaml.safe_dump(totals(clips, a.data), sort_keys=False).strip())
        return 0
    (a.manifest.with_suffix(".md")).write_text((a.manifest.with_suffix(".md")).read_text().split("| id |")[0] + table(clips))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
