"""Writing files so that a reader never sees half of one, hashing them, and decoding input images. The one place
the project does any of these.

Every output (a PNG, a JSON report, a manifest, a model folder, an ONNX file, a TensorRT plan, an AOTInductor
package) is written under a temporary name beside its destination and renamed over it when complete; a failure or a
kill leaves the old file (or nothing) and a `.<name>.tmp-*` leftover at worst, never a truncated file under the real
name. Files get the permissions an ordinary `open()` would give (0666 / 0777 less the umask), not the 0600 / 0700
that Python's temporary files start with, so a service user can read what an export wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give `path` (and a folder's contents) the mode a plain open()/mkdir() would have."""
    mask = _umask()
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """A temporary folder next to `beside` (same filesystem, so renames out of it are atomic), removed at the end."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(src: Path, dst: Path) -> Path:
    """Rename a finished file or folder over `dst` (a folder that exists is removed first)."""
    src, dst = Path(src), Path(dst)
    _publish_mode(src)
    if src.is_dir() and dst.is_dir():
        shutil.rmtree(dst)
    os.replace(src, dst)
    return dst


@contextlib.contextmanager
def staged(dst: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst` to write (a file, or a folder with folder=True); when the block ends
    without an error it replaces `dst`, otherwise it is removed."""
    dst = Path(dst)
    with scratch_folder(dst) as tmp:
        path = tmp / dst.name
        if folder:
            path.mkdir()
        yield path
        move_into_place(path, dst)


def write_atomic(dst: Path, data: bytes | str) -> Path:
    with staged(dst) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(dst)


MAX_JSON_BYTES = 64 << 20  # the C++ reader's limit (runtime/src/manifest.cpp); a 7b export's manifest is ~100 KB
MAX_JSON_DEPTH = 64  # the C++ reader's kMaxDepth (runtime/include/smartedit/json.h)


def loads_json(text: str | bytes, where: str, error: type[Exception]):
    """The JSON value of `text`, nested at most MAX_JSON_DEPTH levels; `error` naming `where` otherwise (a file
    nested deeper than Python's recursion limit is a RecursionError inside json, caught here)."""
    deep = f"{where} is nested deeper than {MAX_JSON_DEPTH} levels: not a file this project writes"
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    level, todo = -1, [value]  # the root is level 0, as in the C++ reader
    while todo:  # breadth first, one level per pass: no recursion on a hostile file
        level += 1
        if level > MAX_JSON_DEPTH:
            raise error(deep)
        todo = [c for v in todo for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
                if isinstance(c, (dict, list))]
    return value


def read_json(path: Path, error: type[Exception], want: type = dict):
    """The JSON value of `path`, of type `want`: at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH levels;
    `error` naming the file and what is wrong with it otherwise (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{path} is over {MAX_JSON_BYTES >> 20} MB: not a file this project writes")
    value = loads_json(data, str(path), error)
    if not isinstance(value, want):
        raise error(f"{path} holds a JSON {type(value).__name__}, not a {want.__name__}")
    return value


def write_json(dst: Path, obj) -> Path:
    return write_atomic(dst, json.dumps(obj, indent=2, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns) -> sha256, for this process


def sha256_file_cached(path: Path) -> str:
    """sha256_file, remembered for this process while the file's inode, size and mtime stay the same (a rewrite or
    an in-place edit changes mtime): a server or benchmark that loads a graph twice hashes it once. About 8 s per
    13.8 GB (the 7b fp16 unet) at the ~1.7 GB/s of one core's SHA-256."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(Path(path))
    return _VERIFIED[key]


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def refuse_overwriting_inputs(outputs: dict[str, Path], inputs: dict[str, Path | None]) -> None:
    """Raise InputError when an output would destroy an input: the same file (by path, or a hard or symbolic link
    to it), a path inside an input folder, or a folder that holds an input; or when two outputs are one file.
    `outputs` / `inputs` map the flag that named a path (e.g. "--out") to the path."""
    from .errors import InputError

    def same(a: Path, b: Path) -> bool:
        try:
            return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
        except OSError:
            return False

    def inside(a: Path, folder: Path) -> bool:
        return folder.is_dir() and a.resolve().is_relative_to(folder.resolve())

    named = [(k, Path(v)) for k, v in inputs.items() if v is not None]
    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    for flag, out in outs:
        for what, src in named:
            if same(out, src) or inside(out, src) or inside(src, out):
                raise InputError(f"{flag} {out} would overwrite the input {what} {src}: write it elsewhere")
    for i, (f1, o1) in enumerate(outs):
        for f2, o2 in outs[i + 1:]:
            if same(o1, o2):
                raise InputError(f"{f1} and {f2} are the same file {o1}: give each its own")


def check_writable_parent(path: Path, what: str) -> None:
    """Refuse at once an output whose folder cannot take a file (read-only, /proc, a full disk's inode table):
    creating and removing a probe file is the only test that also holds for root and for read-only mounts."""
    from .errors import InputError

    probe = Path(path).parent if str(Path(path).parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {path}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{Path(path).name}.probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write into {probe} ({e.strerror or e})") from None


# PIL would open dozens of formats, some through external programs (EPS runs Ghostscript): only these are decoded,
# by every command and the server alike.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def open_image(source: bytes | str | Path, name: str = "image", max_megapixels: float | None = None):
    """A decoded PIL image from a file or its bytes: PNG, JPEG or WebP only (IMAGE_FORMATS), within PIL's
    decompression-bomb limit and, if given, `max_megapixels` (checked from the header, before decoding). Anything
    else is an InputError naming `name` and what is wrong, never the file object."""
    import io

    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise InputError(f"{name} is empty: send the PNG, JPEG or WebP file's bytes")
        stream, what = io.BytesIO(bytes(source)), name
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{name} {path} does not exist" if not path.exists() else f"{name} {path} is not a file")
        stream, what = path, f"{name} {path}"
    try:
        img = Image.open(stream, formats=IMAGE_FORMATS)  # reads the header only
        w, h = img.size
        if max_megapixels is not None and w * h > max_megapixels * 1e6:
            raise InputError(f"{what} is {w}x{h} = {w * h / 1e6:.1f} MP, over the {max_megapixels:g} MP limit")
        img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} is too large to decode ({e})") from None
    except Exception as e:  # PIL raises many types for data it cannot identify; their text may hold the stream's repr
        kind = "not a PNG, JPEG or WebP image" if isinstance(e, Image.UnidentifiedImageError) else \
            f"a damaged image ({type(e).__name__})"
        raise InputError(f"{what} cannot be decoded: {kind}") from None
    return img
