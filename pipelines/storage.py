"""Where a run folder lives: a local folder, or any filesystem pyarrow (so Ray Train) writes.

``--output`` is a local path or a URI pyarrow understands (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://...``); Python callers may pass a
``pyarrow.fs.FileSystem`` instead (``RunConfig(storage_filesystem=...)``), with ``--output``
then a path inside it. Every file of a run folder that the driver touches (``run.json``,
checkpoints, ``results/``) goes through :class:`RunStorage`, so nothing assumes a local
path. Credentials and endpoints come from the filesystem's usual sources (S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...).

A checkpoint is named in ``run.json`` and between stages by a *ref*: a local path, a URI
(``s3://bucket/run/supernet/checkpoint_.../checkpoint.pt``) or, with an explicit
filesystem, a path inside it.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs as pafs

from dsnet.models.checkpoint import stream_sha256
from dsnet.utils.atomic import atomic_write_text

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(RuntimeError):
    """The run folder's storage cannot be reached, read or written."""


def is_uri(output: str) -> bool:
    """Whether ``output`` names remote storage (``s3://...``); ``file://`` is local."""
    m = _SCHEME.match(output)
    return bool(m) and m.group(1).lower() != "file"


def _local_path(output: str) -> Path:
    return Path(output.removeprefix("file://")).expanduser().resolve()


@dataclass(frozen=True)
class RunStorage:
    """One run folder: ``root`` inside the filesystem ``fs``.

    ``prefix`` is what turns a path inside ``fs`` into the ref the user sees (``s3://``
    for storage given by URI, empty for a local folder or an explicit filesystem).
    ``explicit`` marks a filesystem the caller passed (handed to Ray as
    ``storage_filesystem``).
    """

    fs: pafs.FileSystem
    root: str
    prefix: str = ""
    explicit: bool = False

    @classmethod
    def resolve(cls, output: str, name: str,
                filesystem: pafs.FileSystem | None = None) -> RunStorage:
        """The run folder ``<output>/<name>``.

        Raises:
            StorageError: ``output`` is a URI pyarrow cannot open (unknown scheme,
                malformed, a filesystem library missing).
        """
        if filesystem is not None:
            return cls(filesystem, posixpath.join(output.rstrip("/") or "/", name),
                       explicit=True)
        if not is_uri(output):
            return cls.local(_local_path(output) / name)
        try:
            fs, base = pafs.FileSystem.from_uri(output)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise StorageError(f"--output {output}: pyarrow cannot open it ({e}); use a "
                               "local folder or a URI such as s3://bucket/prefix") from None
        scheme = _SCHEME.match(output).group(1)  # type: ignore[union-attr]
        return cls(fs, posixpath.join(base.rstrip("/"), name), f"{scheme}://")

    @classmethod
    def local(cls, folder: str | Path) -> RunStorage:
        """A run folder on this machine's (or a mounted) disk."""
        return cls(pafs.LocalFileSystem(), str(Path(folder).resolve()))

    @property
    def is_local(self) -> bool:
        """Whether files are plain local paths (checkpoints read in place, atomic renames)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    def __str__(self) -> str:
        return self.ref(self.root)

    def path(self, *parts: str) -> str:
        """A path inside the run folder (in ``fs``)."""
        return posixpath.join(self.root, *parts)

    def ref(self, path: str) -> str:
        """The ref of a path inside ``fs`` (a URI for URI-given storage)."""
        return f"{self.prefix}{path}"

    def locate(self, ref: str | Path) -> str:
        """The path inside ``fs`` of a ref."""
        ref = str(ref)
        if self.prefix and ref.startswith(self.prefix):
            return ref[len(self.prefix):]
        return ref

    def holder(self, ref: str | Path) -> RunStorage:
        """The storage that holds ``ref``: this one for its own refs, the filesystem of
        another URI, else this machine (a user's local ``resume:`` file)."""
        ref = str(ref)
        if (self.prefix and ref.startswith(self.prefix)) or \
                (self.explicit and ref.startswith(self.root.rstrip("/") + "/")):
            return self
        if is_uri(ref):
            fs, _ = pafs.FileSystem.from_uri(ref)
            return RunStorage(fs, "/", _SCHEME.match(ref).group(0))  # type: ignore[union-attr]
        return RunStorage.local(Path(ref).parent)

    def run_config_kwargs(self, parent: str | None = None) -> dict[str, Any]:
        """``RunConfig``'s ``storage_path`` (and ``storage_filesystem``) for runs inside
        ``parent`` (default: the run folder)."""
        path = parent or self.root
        if self.explicit:
            return {"storage_path": path, "storage_filesystem": self.fs}
        return {"storage_path": self.ref(path)}

    # ------------------------------------------------------------------ file operations

    def _info(self, ref: str | Path) -> pafs.FileInfo:
        return self.fs.get_file_info(self.locate(ref))

    def is_file(self, ref: str | Path) -> bool:
        return self._info(ref).type == pafs.FileType.File

    def size(self, ref: str | Path) -> int:
        return int(self._info(ref).size)

    def sha256(self, ref: str | Path) -> str:
        """Hex SHA-256 of a file, streamed (a remote checkpoint is never kept whole)."""
        with self.fs.open_input_stream(self.locate(ref)) as f:
            return stream_sha256(f)

    def read_text(self, ref: str | Path) -> str | None:
        """A text file's content, or None if it does not exist."""
        if not self.is_file(ref):
            return None
        with self.fs.open_input_stream(self.locate(ref)) as f:
            return f.read().decode("utf-8")

    def write_text(self, ref: str | Path, text: str) -> None:
        """Replace a text file whole: atomic rename locally; an object store's upload
        replaces the object only once complete."""
        if self.is_local:
            atomic_write_text(self.locate(ref), text)
            return
        with self.fs.open_output_stream(self.locate(ref)) as f:
            f.write(text.encode("utf-8"))

    def delete_dir(self, ref: str | Path) -> None:
        """Delete a folder and everything in it; nothing happens if it is not there."""
        with contextlib.suppress(FileNotFoundError):
            if self._info(ref).type == pafs.FileType.Directory:
                self.fs.delete_dir(self.locate(ref))

    def upload_dir(self, local_dir: str | Path, ref: str | Path) -> None:
        """Copy a local folder's files to ``ref`` (created)."""
        self.fs.create_dir(self.locate(ref), recursive=True)
        pafs.copy_files(str(local_dir), self.locate(ref),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    @contextlib.contextmanager
    def local_copy(self, ref: str | Path) -> Iterator[Path]:
        """A local path to the file ``ref``: itself on local storage, else a temporary
        download removed on exit."""
        if self.is_local:
            yield Path(self.locate(ref))
            return
        with tempfile.TemporaryDirectory(prefix="dsnet-fetch-") as tmp:
            local = Path(tmp) / posixpath.basename(self.locate(ref))
            pafs.copy_files(self.locate(ref), str(local), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield local

    def check_writable(self, where: str = "this machine") -> None:
        """Create the run folder, then write, read back and delete a probe file in it.

        Raises:
            StorageError: naming the storage, ``where`` and the filesystem's error.
        """
        probe = self.path(f".dsnet-probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"probe")
            with self.fs.open_input_stream(probe) as f:
                if f.read() != b"probe":
                    raise OSError("a file read back differs from what was written")
            self.fs.delete_file(probe)
        except (OSError, pyarrow.ArrowException) as e:
            raise StorageError(f"cannot write the run folder {self} from {where}: "
                               f"{' '.join(str(e).split())}; check --output and the "
                               "storage's credentials (for S3: AWS_ENDPOINT_URL, "
                               "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None


def as_storage(run_dir: RunStorage | str | Path) -> RunStorage:
    """``run_dir`` as a RunStorage (a plain path is a local folder)."""
    return run_dir if isinstance(run_dir, RunStorage) else RunStorage.local(run_dir)
