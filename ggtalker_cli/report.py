"""The eval report: its schema (report.json, every metric entry with its definition key) and
the pages for people: report.md, plots and a self-contained report.html.

`metric` makes one entry, `validate` checks a report against `SCHEMA` (a JSON-schema subset),
and `write` refuses a report that fails it before writing anything. Everything else here is
rebuilt from report.json (+ data.npz, scores.npz and the videos), so the score phase, run later
on another machine, redraws it all. The page has no external resources:
inline CSS and JS, relative links to the PNGs and videos beside it, synchronized players (one
play button and one time for ground truth | render | error). It also checks itself: every media
element that fails to load, and every script error, is collected into `body[data-status]`,
which the headless-Chromium test reads.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from . import metrics
from .artifacts import atomic_write_bytes
from .errors import Exit, GGError

SCHEMA_VERSION = 1


def metric(definition: str, value: float | None, unit: str | None = None, note: str | None = None, status: str | None = None) -> dict:
    """One metric entry of report.json: value (JSON-safe), its definition key, unit, note/status."""
    if definition not in metrics.DEFINITIONS:
        raise KeyError(f"no definition '{definition}'")
    entry: dict[str, Any] = {"value": None if value is None else metrics.jsonable(value), "definition": definition}
    for key, text in (("unit", unit), ("note", note), ("status", status)):
        if text:
            entry[key] = text
    return entry


# ---------------------------------------------------------------------------------------------
# report.json schema (a JSON-schema subset, checked by `validate`)

_METRIC = {
    "type": "object",
    "required": ["value", "definition"],
    "properties": {
        "value": {"type": ["number", "string", "null"], "enum_strings": ["inf", "-inf"]},
        "definition": {"type": "string", "enum": sorted(metrics.DEFINITIONS)},
        "unit": {"type": "string"},
        "note": {"type": "string"},
        "status": {"type": "string"},
    },
    "additionalProperties": False,
}
_METRICS = {"type": "object", "values": _METRIC}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "schema_version", "created", "ggtalker", "avatar", "clip", "protocol", "variants", "ood", "speed", "optional", "pending"],
    "properties": {
        "schema": {"type": "string", "enum": ["ggtalker-eval-report"]},
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": {"type": "string"},
        "ggtalker": {"type": "string"},
        "avatar": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
        "clip": {"type": "object", "required": ["path", "fps", "size", "test_frames"],
                 "properties": {"path": {"type": "string"}, "fps": {"type": "number"}, "size": {"type": "integer"},
                                "test_frames": {"type": "array", "items": {"type": "integer"}}, "av_sync_lag": _METRIC}},
        "protocol": {"type": "object", "required": ["doc", "setting", "size", "frames"],
                     "properties": {"doc": {"type": "string"}, "setting": {"type": "string"}, "size": {"type": "integer"}, "frames": {"type": "integer"}}},
        "variants": {
            "type": "object",
            "values": {
                "type": "object",
                "required": ["kind", "description", "metrics"],
                "properties": {"kind": {"type": "string", "enum": ["avatar", "baseline", "ceiling", "floor"]}, "description": {"type": "string"},
                               "video": {"type": ["string", "null"]}, "metrics": _METRICS},
                "additionalProperties": False,
            },
        },
        "ood": {"type": "array", "items": {"type": "object", "required": ["audio", "seconds", "frames", "metrics"],
                                           "properties": {"audio": {"type": "string"}, "seconds": {"type": "number"}, "frames": {"type": "integer"},
                                                          "video": {"type": ["string", "null"]}, "metrics": _METRICS}}},
        "speed": {"type": "object", "required": ["device", "metrics"], "properties": {"device": {"type": "string"}, "metrics": _METRICS}},
        "optional": {"type": "object", "values": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}},
        "pending": {"type": "array", "items": {"type": "string"}},
        "files": {"type": "object", "values": {"type": "string"}},
    },
}
_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def validate(value: Any, schema: dict = SCHEMA, where: str = "report") -> list[str]:
    """Errors of `value` against `schema` (type, required, properties, additionalProperties,
    values (schema of every value of an object), items, enum); empty when valid."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        ok = any(isinstance(value, _TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool)) for k in kinds)
        if not ok:
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, str) and "enum_strings" in schema and value not in schema["enum_strings"]:
        errors.append(f"{where}: string value {value!r} not one of {schema['enum_strings']}")
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{where}: {value} is not valid JSON (use 'inf'/'-inf' or null)")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing '{key}'")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{where}.{key}")
            elif "values" in schema:
                errors += validate(item, schema["values"], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected key '{key}'")
    if isinstance(value, list) and "items" in schema:
        for k, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{k}]")
    return errors


COLUMNS = (("psnr", "PSNR dB"), ("ssim", "SSIM"), ("psnr_face", "PSNR face"), ("ssim_face", "SSIM face"), ("psnr_seam", "PSNR seam"),
           ("lmd", "LMD px"), ("mouth_open_r", "mouth r"), ("mouth_lag", "vs GT lag fr"),
           ("av_sync_lag", "A/V lag fr"), ("av_sync_lag_rel", "A/V lag vs clip fr"), ("av_sync_r", "A/V r"), ("blink_rate", "blinks/min"))
BARS = (("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lmd", "LMD (px at 512²) ↓"), ("mouth_open_r", "mouth-opening r ↑"))
COLOURS = {"tracked": "tab:blue", "audio": "tab:red", "no_audio": "tab:gray", "tracked_paste": "tab:cyan", "retrieval_landmarks": "tab:olive",
           "retrieval_blendshapes_pose": "tab:brown", "gt": "black", "detector_floor": "tab:green"}


def save_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise GGError(f"{path}: PNG encoding failed", Exit.OUTPUT)
    atomic_write_bytes(path, buf.tobytes())


def _figure(fig: plt.Figure, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def fmt(entry: dict | None) -> str:
    """A metric entry as table text: numbers rounded, inf as ∞, missing values as their status."""
    if not entry:
        return ""
    value = entry.get("value")
    if value is None:
        status = entry.get("status", "undefined")
        return "pending" if status.startswith("pending") else "n/a"
    if value in ("inf", "-inf"):
        return "∞" if value == "inf" else "−∞"
    if entry["definition"] in ("av_lag", "mouth_lag", "render_lag"):
        return f"{int(value):+d}"
    if entry["definition"] in ("av_sync_lag", "av_sync_lag_rel"):
        return f"{value:+.1f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _value(entry: dict | None) -> float:
    v = (entry or {}).get("value")
    return math.inf if v == "inf" else -math.inf if v == "-inf" else math.nan if v is None else float(v)


def bars(folder: Path, rep: dict) -> str:
    fig, axes = plt.subplots(1, len(BARS), figsize=(4 * len(BARS), 3.6))
    for ax, (key, title) in zip(axes, BARS):
        names = [n for n, v in rep["variants"].items() if np.isfinite(_value(v["metrics"].get(key))) and n != "gt"]
        values = [_value(rep["variants"][n]["metrics"][key]) for n in names]
        ax.barh(range(len(names)), values, color=[COLOURS.get(n, "tab:purple") for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle("held-out test frames: the avatar against baselines, ceiling and floor", fontsize=10)
    fig.tight_layout()
    _figure(fig, folder / "bars.png")
    return "bars.png"


def mouth_curves(folder: Path, rep: dict) -> str:
    """Mouth opening over the test frames: ground truth vs predictions, audio envelope below."""
    fps = rep["clip"]["fps"]
    scores = folder / "scores.npz"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True, height_ratios=(1.6, 1))
    if scores.is_file():
        with np.load(scores) as s:
            for name, colour in (("gt", "black"), ("audio", "tab:red"), ("no_audio", "0.6")):
                track = s[f"mouth_open_{name}"]
                top.plot(np.arange(len(track)) / fps, track, color=colour, lw=1.2, label=name)
            envelope = s["envelope"]
        top.set_ylabel("mouth opening (detected)")
    else:
        with np.load(folder / "data.npz") as d:
            track = d["a2e_mouth_open"]
        top.plot(np.arange(len(track)) / fps, track, "r-", lw=1.2, label="audio (A2E inner-lip gap, cm)")
        top.set_ylabel("A2E mouth gap (cm)")
        top.set_title("landmark scoring pending: A2E prediction only", fontsize=9)
        from .media import read_wav
        from .metrics import audio_envelope

        samples, rate = read_wav(folder / "audio" / "test.wav")
        envelope = audio_envelope(samples, rate, fps, len(track))
    top.legend(fontsize=8, loc="upper right")
    bottom.plot(np.arange(len(envelope)) / fps, envelope, color="tab:purple", lw=1)
    bottom.set_ylabel("audio envelope")
    bottom.set_xlabel("time into the test split (s)")
    fig.tight_layout()
    _figure(fig, folder / "mouth.png")
    return "mouth.png"


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _variant_rows(rep: dict) -> list[list[str]]:
    return [[name, v["kind"]] + [fmt(v["metrics"].get(k)) for k, _ in COLUMNS] for name, v in rep["variants"].items()]


def _ood_rows(rep: dict) -> list[list[str]]:
    keys = ("av_sync_lag", "av_sync_lag_rel", "av_sync_r", "a2e_av_sync_lag", "a2e_av_sync_r", "render_lag", "synth_fps")
    return [[Path(e["audio"]).name, f"{e['seconds']:.1f}"] + [fmt(e["metrics"].get(k)) for k in keys] for e in rep["ood"]]


OOD_HEADER = ["audio", "s", "A/V lag (render)", "vs clip's own", "A/V r (render)", "A/V lag (A2E)", "A/V r (A2E)", "video vs driven lag", "synth fps"]


def markdown(rep: dict) -> str:
    speed = rep["speed"]
    parts = [
        f"# ggtalker eval — {Path(rep['avatar']['path']).name}",
        (f"Clip `{rep['clip']['path']}`, test frames {rep['clip']['test_frames'][0]}–{rep['clip']['test_frames'][1] - 1} "
         f"({rep['protocol']['frames']} frames at {rep['protocol']['size']}², {rep['clip']['fps']:g} fps); device {speed['device']}; {rep['created']}."),
        f"Protocol ({rep['protocol']['doc']}): {rep['protocol']['setting']}",
        "## Held-out frames",
        _table(_variant_rows(rep), ["variant", "kind"] + [t for _, t in COLUMNS]),
    ]
    parts.append("\n".join(f"- **{n}**: {v['description']}" for n, v in rep["variants"].items()))
    if rep["ood"]:
        parts += ["## Out-of-distribution audio", _table(_ood_rows(rep), OOD_HEADER)]
    parts += ["## Speed", _table([[k, fmt(e), e.get("unit", ""), e.get("note", "")] for k, e in speed["metrics"].items()], ["metric", "value", "unit", "note"])]
    parts += ["## Not computed", "\n".join(f"- {k}: {v['status']}" for k, v in rep["optional"].items())]
    if rep["pending"]:
        parts += ["## Pending", "\n".join(f"- {p}" for p in rep["pending"])]
    parts += ["## Figures", "![strips](strips.png)", "![bars](bars.png)", "![mouth](mouth.png)"]
    return "\n\n".join(parts) + "\n"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.avatar td{background:#f3f7ff}img{max-width:100%}
.sync{margin:12px 0;padding:8px;border:1px solid #ddd}.sync video{width:32%;margin-right:1%}
.sync .labels span{display:inline-block;width:32%;margin-right:1%;font-weight:600}code{background:#f4f4f4}"""
_JS = """const problems=[];
window.addEventListener('error',e=>{const t=e.target;problems.push(t&&t!==window?('cannot load '+(t.currentSrc||t.src||t.href)):String(e.message));},true);
function syncGroup(g){const v=[...g.querySelectorAll('video')];const m=v[0];
 g.querySelector('button').addEventListener('click',()=>{if(m.paused)v.forEach(x=>x.play().catch(()=>{}));else v.forEach(x=>x.pause());});
 const follow=()=>v.slice(1).forEach(x=>{if(Math.abs(x.currentTime-m.currentTime)>0.04)x.currentTime=m.currentTime;});
 m.addEventListener('timeupdate',follow);m.addEventListener('seeked',follow);m.addEventListener('pause',()=>v.forEach(x=>x.pause()));}
document.querySelectorAll('.sync').forEach(syncGroup);
const media=[...document.querySelectorAll('video,img')];
Promise.all(media.map(x=>new Promise(done=>{
 const ok=x.tagName==='IMG'?x.complete&&x.naturalWidth>0:x.readyState>=1;
 if(ok)return done();
 x.addEventListener(x.tagName==='IMG'?'load':'loadedmetadata',()=>done());
 x.addEventListener('error',()=>{problems.push('cannot load '+(x.currentSrc||x.src));done();});
}))).then(()=>{document.body.dataset.status=problems.length?'errors: '+problems.join(' | '):'ok';});"""


def _html_table(rows: list[list[str]], header: list[str], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for i, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _players(title: str, videos: list[tuple[str, str]]) -> str:
    labels = "".join(f"<span>{html.escape(label)}</span>" for label, _ in videos)
    tags = "".join(f"<video src='{html.escape(src)}' preload='metadata' {'muted' if k else ''} playsinline></video>" for k, (_, src) in enumerate(videos))
    return f"<div class='sync'><b>{html.escape(title)}</b> <button>play / pause</button><div class='labels'>{labels}</div>{tags}</div>"


def page(rep: dict, figures: list[str]) -> str:
    variants = rep["variants"]
    groups = [
        ("held-out audio (the full system)", [("ground truth", variants["gt"]["video"]), ("render: audio-driven", variants["audio"]["video"]),
                                              ("error ×4", "videos/error_audio.mp4")]),
        ("tracked expressions (visual quality)", [("ground truth", variants["gt"]["video"]), ("render: tracked", variants["tracked"]["video"]),
                                                  ("error ×4", "videos/error_tracked.mp4")]),
        ("no-audio baseline", [("ground truth", variants["gt"]["video"]), ("render: mean expression", variants["no_audio"]["video"]),
                               ("retrieval (landmarks)", variants["retrieval_landmarks"]["video"])]),
    ]
    body = [
        f"<h1>ggtalker eval — {html.escape(Path(rep['avatar']['path']).name)}</h1>",
        (f"<p>Clip <code>{html.escape(rep['clip']['path'])}</code>, test frames {rep['clip']['test_frames'][0]}–{rep['clip']['test_frames'][1] - 1} "
         f"({rep['protocol']['frames']} frames at {rep['protocol']['size']}², {rep['clip']['fps']:g} fps). Device {html.escape(rep['speed']['device'])}. "
         f"{html.escape(rep['created'])}. ggtalker {html.escape(rep['ggtalker'])}.</p>"),
        f"<p><b>Protocol</b> ({html.escape(rep['protocol']['doc'])}): {html.escape(rep['protocol']['setting'])}</p>",
        "<h2>Held-out frames</h2>",
        _html_table(_variant_rows(rep), ["variant", "kind"] + [t for _, t in COLUMNS], [v["kind"] for v in variants.values()]),
        "<ul>" + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(v['description'])}</li>" for n, v in variants.items()) + "</ul>",
        "<h2>Watch</h2>",
        *[_players(title, vids) for title, vids in groups],
    ]
    if rep["ood"]:
        body += ["<h2>Out-of-distribution audio</h2>", _html_table(_ood_rows(rep), OOD_HEADER)]
        body += [f"<div><b>{html.escape(Path(e['audio']).name)}</b><br>"
                 f"<video src='{html.escape(e['video'])}' controls preload='metadata' width='320'></video></div>"
                 for e in rep["ood"] if e.get("video")]
    speed = rep["speed"]["metrics"]
    body += ["<h2>Speed</h2>", _html_table([[k, fmt(e), e.get("unit", ""), e.get("note", "")] for k, e in speed.items()], ["metric", "value", "unit", "note"])]
    body += ["<h2>Not computed</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v['status'])}</li>" for k, v in rep["optional"].items()) + "</ul>"]
    if rep["pending"]:
        body += ["<h2>Pending</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in rep["pending"]) + "</ul>"]
    body += ["<h2>Figures</h2>", *[f"<p><img src='{html.escape(f)}' alt='{html.escape(f)}'></p>" for f in figures]]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ggtalker eval</title><style>{_CSS}</style></head>"
            f"<body data-status='loading'>{''.join(body)}<script>{_JS}</script></body></html>\n")


def referenced_files(text: str) -> list[str]:
    """Every src/href of a page (what must exist beside it)."""
    import re

    return re.findall(r"""(?:src|href)=['"]([^'"#]+)['"]""", text)


def write(folder: Path, rep: dict[str, Any]) -> None:
    """Validate (against SCHEMA), then write report.json, the plots, report.md and report.html into `folder`."""
    errors = validate(rep)
    if errors:
        raise GGError(f"{folder / 'report.json'}: report fails its schema ({errors[0]}; {len(errors)} errors); this is a bug", Exit.INTERNAL)
    atomic_write_bytes(folder / "report.json", (json.dumps(rep, indent=1) + "\n").encode())
    figures = [f for f in ("strips.png",) if (folder / f).is_file()] + [bars(folder, rep), mouth_curves(folder, rep)]
    atomic_write_bytes(folder / "report.md", markdown(rep).encode())
    text = page(rep, figures)
    missing = [f for f in referenced_files(text) if not (folder / f).is_file()]
    if missing:
        raise GGError(f"{folder}: report.html would reference missing files ({', '.join(missing)}); this is a bug", Exit.INTERNAL)
    atomic_write_bytes(folder / "report.html", text.encode())
