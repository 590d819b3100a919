"""Shared fixtures: the real test media beside the checkout, short cuts of it, one preprocessed clip.

The real clips live in `../shared/data/real` (CI puts `../shared` beside the checkout). They are
third-party footage: cuts are written to pytest's temporary folders only, never into the repo.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"


def _ffmpeg_binary() -> str:
    """The ffmpeg command line that makes the tests' inputs (cuts, filters, lavfi sources): a
    system one when on PATH, else imageio-ffmpeg's static binary from pip (the `test` extra).
    ggtalker itself needs neither: it reads and writes media in process (PyAV)."""
    import imageio_ffmpeg

    return shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()


FFMPEG = _ffmpeg_binary()


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; a failure shows its stderr."""
    done = subprocess.run([FFMPEG, "-nostdin", "-y", "-loglevel", "error", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def streams(path: Path) -> dict[str, dict]:
    """What ffprobe -count_frames says of a file, read back by decoding every packet (PyAV):
    per stream type its codec_name, nb_read_frames, duration (s) and pix_fmt (video)."""
    import av

    found: dict[str, dict] = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            frames = sum(1 for _ in container.decode(stream))
            container.seek(0)
            found[stream.type] = {"codec_name": stream.codec_context.codec.canonical_name, "nb_read_frames": frames,
                                  "duration": float(stream.duration * stream.time_base) if stream.duration else None,
                                  "pix_fmt": getattr(stream.codec_context, "pix_fmt", None)}  # fmt: skip
    return found


def same_tensors(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same names and bit-identical tensors (resume tests)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not (REAL / "videos").is_dir():
        pytest.skip(f"real test media not found at {REAL} (CI puts ../shared beside the checkout)")
    return REAL


@pytest.fixture(scope="session")
def real_video(real_dir):
    """real_video("aoc_8s_512_25fps") → path of that real video."""

    def get(name: str) -> Path:
        path = real_dir / "videos" / f"{name}.mp4"
        if not path.is_file():
            pytest.skip(f"{path} missing")
        return path

    return get


@pytest.fixture(scope="session")
def cuts(tmp_path_factory, real_video) -> Path:
    """Short re-encoded cuts of real clips (3 s each) in a temporary folder."""
    folder = tmp_path_factory.mktemp("cuts")
    for name in ("aoc_8s_512_25fps", "macron_50s_512_30fps", "katiehill_8s_512_25fps"):
        ffmpeg("-ss", "1", "-t", "3", "-i", str(real_video(name)), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18",
               "-c:a", "aac", str(folder / f"{name}.mp4"))
    return folder


@pytest.fixture(scope="session")
def aoc_cut(cuts) -> Path:
    return cuts / "aoc_8s_512_25fps.mp4"


@pytest.fixture(scope="session")
def macron_cut(cuts) -> Path:
    return cuts / "macron_50s_512_30fps.mp4"


@pytest.fixture(scope="session")
def clip_128(tmp_path_factory, aoc_cut):
    """The aoc cut preprocessed once at 128² (for every test that needs a real clip/)."""
    from ggtalker_cli.config import load_config
    from ggtalker_cli.stages import preprocess

    out = tmp_path_factory.mktemp("clips") / "aoc_128"
    summary = preprocess.run(aoc_cut, out, load_config("fast", {"preprocess": {"size": 128}}))
    return out, summary


@pytest.fixture(scope="session")
def tiny_avatar(tmp_path_factory, clip_128):
    """A tiny avatar adapted once from clip_128 at 64² (head, inpainter) plus a tiny A2E prior
    fitted on the same clip, whose a2e.safetensors is placed in the avatar as adapt's A2E."""
    import shutil

    import torch

    from ggtalker_cli.config import load_config
    from ggtalker_cli.stages import adapt, fit_prior

    clip, _ = clip_128
    root = tmp_path_factory.mktemp("avatar")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two on a busy 2-core box
    try:
        a2e_cfg = {"window": 16, "d_model": 32, "layers": 1, "heads": 2, "lip_components": 4, "steps": 100, "batch": 4, "val_every": 10}
        fit_prior.run([clip], root / "prior", load_config("fast", {"a2e": a2e_cfg}), parts="a2e", holdout=None, device="cpu")
        cfg = load_config("fast", {"adapt": {"steps": 40, "size": 64, "uv_res": 16, "eval_frames": 2, "log_every": 10},
                                   "inpainter": {"steps": 300, "log_every": 50}})
        adapt.run(clip, root / "avatar", cfg, device="cpu")
    finally:
        torch.set_num_threads(threads)
    shutil.copy(root / "prior" / "a2e.safetensors", root / "avatar" / "a2e.safetensors")
    return root / "avatar", root / "prior", clip


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide whisper with random weights in openai-whisper's checkpoint format: it
    exercises the real `whisper.load_model` path (test_audio, test_a2e) in milliseconds."""
    import dataclasses

    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)
    path = tmp_path_factory.mktemp("whisper") / "tiny-random.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread; two threads on a busy 2-core box spin-wait
    many times slower. Modules of tiny-model tests opt in with `pytestmark`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def console_state(monkeypatch):
    """`--json` and `--quiet` set the console module's state (console.configure) for the rest of
    the process: each test gets a copy, so a CLI run in one test (CliRunner, in process) does not
    turn on JSON mode or silence the output of the next."""
    from ggtalker_cli import console

    monkeypatch.setattr(console, "_state", dict(console._state))
