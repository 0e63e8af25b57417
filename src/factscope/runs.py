"""Run directories: config, summary, tables, figures, report and resumable checkpoints.

A run directory looks like this::

    DIR/config.json          what was run: the analysis config + versions + creation time
    DIR/summary.json         headline numbers (merged by ``update_summary``)
    DIR/NAME.csv             result tables
    DIR/NAME.png             figures
    DIR/sections.json        report layout (``add_section``)
    DIR/report.html          self-contained report (``write_report``)
    DIR/checkpoints/NAME.jsonl   one JSON record per finished unit of work

Every file is written atomically (temporary file in the same directory, fsync, ``os.replace``),
so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import platform
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from factscope.errors import FactscopeError
from factscope.layout import CHECKPOINT_DIR, NON_DEFINING_KEYS  # noqa: F401 (part of this module's API)
from factscope.report import render_report

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
SECTIONS_FILE = "sections.json"
REPORT_FILE = "report.html"

# Entries the CLI adds to every run created within a command (see ``recording``).
_RECORDED: contextvars.ContextVar[Callable[[Mapping[str, Any]], Mapping[str, Any]] | None] = contextvars.ContextVar(
    "factscope_recorded_config", default=None
)

# Runs this process started in a new or empty directory, with the outermost directory it created.
_UNSTARTED: list[tuple["Run", Path | None]] = []
_BOOKKEEPING = {CONFIG_FILE, SUMMARY_FILE, SECTIONS_FILE}


def unstarted_mark() -> int:
    """A mark for :func:`discard_unstarted_runs`: only runs started after it are considered."""
    return len(_UNSTARTED)


def discard_unstarted_runs(since: int = 0) -> list[Path]:
    """Remove the directories of runs started (after the mark ``since``) that hold no result yet
    (only config.json, summary.json, sections.json and empty folders). The CLI calls this when a
    command fails (bad model, bad data, interrupted while loading), so a corrected rerun is not
    refused with "already exists" or "config differs". A directory with any table, figure or
    checkpoint record is kept. Returns the removed directories."""
    import shutil

    removed = []
    while len(_UNSTARTED) > since:
        run, created = _UNSTARTED.pop()
        files = [p for p in run.dir.rglob("*") if p.is_file()] if run.dir.is_dir() else []
        if any(p.parent != run.dir or p.name not in _BOOKKEEPING for p in files):
            continue
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
            removed.append(created)
        elif run.dir.is_dir():  # it existed empty: leave it empty
            for p in run.dir.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(run.dir)
    return removed


def forget_unstarted_runs(since: int = 0) -> None:
    """A command finished: its runs (those after the mark ``since``) are results, not leftovers."""
    del _UNSTARTED[since:]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort; not supported everywhere, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", suffix=_TMP_SUFFIX, dir=directory)
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files with mode 0600; give the result ordinary permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths, tuples and sets into plain JSON values."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return float(obj)  # np.float64 is a float subclass; keep exact value
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy / torch scalars and arrays, without importing either
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    raise TypeError(f"cannot store a {type(obj).__name__} in JSON: {obj!r}")


def _dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, _dumps(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a malformed one raises FactscopeError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FactscopeError(f"{path} is not UTF-8 text: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FactscopeError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


# --------------------------------------------------------------------------------------------
# versions and config


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect_versions() -> dict[str, str | None]:
    """Versions that matter for reproducing a run (read from package metadata, no imports)."""
    import factscope

    versions: dict[str, str | None] = {
        "factscope": factscope.__version__,
        "python": platform.python_version(),
    }
    for pkg in ("torch", "transformers", "numpy", "pandas"):
        versions[pkg] = _package_version(pkg)
    versions["platform"] = platform.platform(terse=True)
    return versions


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    # round trip through JSON so that tuples vs lists, Paths vs str etc. compare equal on resume
    return json.loads(_dumps(dict(config), indent=None))


def _defining(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NON_DEFINING_KEYS}


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    old_d, new_d = _defining(old), _defining(new)
    diffs = []
    for key in sorted(set(old_d) | set(new_d)):
        if key not in old_d:
            diffs.append(f"{key}: not set in the existing run, now {_short(new_d[key])}")
        elif key not in new_d:
            diffs.append(f"{key}: was {_short(old_d[key])} in the existing run, now not set")
        elif old_d[key] != new_d[key]:
            diffs.append(f"{key}: was {_short(old_d[key])} in the existing run, now {_short(new_d[key])}")
    return diffs


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(_TMP_SUFFIX):
        raise ValueError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '-', '.' (no path separators)"
        )
    return name


def _strip_ext(name: str, ext: str) -> str:
    return name[: -len(ext)] if name.endswith(ext) else name


# --------------------------------------------------------------------------------------------
# checkpoints


def _freeze_key(key: Any) -> Any:
    """JSON turns tuples into lists; turn them back so that keys are hashable."""
    if isinstance(key, list):
        return tuple(_freeze_key(k) for k in key)
    return key


class Checkpoint:
    """Append-only JSONL log of finished units of work: one ``{"key": ..., **record}`` per line.

    Each append is flushed and fsynced. When the file is loaded, a truncated last line (the
    process was killed mid-write) is dropped from the file; any other malformed line is an
    error. Keys may be strings, numbers or tuples of those (tuples come back as tuples).
    Floats round-trip exactly, so a resumed run reproduces the same results.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._records: list[dict[str, Any]] = []
        self._keys: set[Any] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0  # byte offset just after the last good line
        pos = 0
        lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            raw = data[pos:end]
            lineno += 1
            is_last = end >= len(data)
            if raw.strip():
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not isinstance(rec, dict) or "key" not in rec:
                        raise ValueError("not a record with a 'key'")
                    if nl < 0:
                        raise ValueError("no newline at the end")
                except (ValueError, UnicodeDecodeError) as e:
                    if is_last:
                        break  # killed mid-write: drop the partial line below
                    raise FactscopeError(
                        f"checkpoint {self.path} is corrupt at line {lineno} ({e}); "
                        "delete it to redo that part of the run"
                    ) from None
                rec["key"] = _freeze_key(rec["key"])
                if rec["key"] in self._keys:
                    raise FactscopeError(f"checkpoint {self.path} has key {rec['key']!r} twice (line {lineno})")
                self._keys.add(rec["key"])
                self._records.append(rec)
            good_end = end
            pos = end
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def done(self) -> set[Any]:
        """Keys of the finished units of work."""
        return set(self._keys)

    def pending(self, keys: Iterable[Any]) -> list[Any]:
        """The keys of ``keys`` that are not finished yet, in their order."""
        return [k for k in keys if k not in self]

    def __contains__(self, key: Any) -> bool:
        return _freeze_key(to_jsonable(key)) in self._keys

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict[str, Any]]:
        """All records in the order they were appended, each with its ``"key"``."""
        return [dict(r) for r in self._records]

    def get(self, key: Any, default: Any = None) -> dict[str, Any] | None:
        key = _freeze_key(to_jsonable(key))
        for r in self._records:
            if r["key"] == key:
                return dict(r)
        return default

    def append(self, key: Any, record: Mapping[str, Any] | None = None) -> None:
        """Record that unit ``key`` is finished, with its results (a dict of JSON-able values)."""
        record = dict(record or {})
        if "key" in record:
            raise ValueError("a checkpoint record may not contain a field named 'key'")
        jkey = to_jsonable(key)
        fkey = _freeze_key(jkey)
        try:
            hash(fkey)
        except TypeError:
            raise ValueError(f"checkpoint key must be a string, number or tuple, not {key!r}") from None
        if fkey in self._keys:
            raise ValueError(f"checkpoint {self.path.name}: key {key!r} was already recorded")
        line = json.dumps({"key": jkey, **to_jsonable(record)}, ensure_ascii=False, allow_nan=True)
        data = (line + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        rec = json.loads(line)
        rec["key"] = fkey
        self._keys.add(fkey)
        self._records.append(rec)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} records)"


# --------------------------------------------------------------------------------------------
# runs



def check_out_dir(out: str | os.PathLike, resume: bool = False) -> bool:
    """Refuse an ``--out`` that cannot hold a run: a file, a non-empty directory without
    ``resume``, or (with ``resume``) one that is no factscope run. Returns whether ``out`` is a
    non-empty directory (a run to resume). The CLI calls it before loading anything; ``Run.create``
    again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactscopeError(f"--out {out} exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not resume:
        raise FactscopeError(
            f"output directory {out} already exists and is not empty; "
            "pass --resume to continue the run in it, or choose another --out directory"
        )
    if nonempty and not (out / CONFIG_FILE).is_file():
        raise FactscopeError(
            f"cannot resume in {out}: it is not empty but has no {CONFIG_FILE}, so it is not "
            "a factscope run; choose another --out directory"
        )
    return nonempty


@contextlib.contextmanager
def recording(entries: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> Iterator[None]:
    """Within the block, :meth:`Run.create` adds ``entries(config)`` to each new run's config (the
    keys the command's own config lacks; they are analysis-defining, so compared on resume).

    The CLI's ``--dtype`` option uses it to record the dtype and where the weights come from
    without every command plumbing them through.
    """
    token = _RECORDED.set(entries)
    try:
        yield
    finally:
        _RECORDED.reset(token)


class Run:
    """One analysis run directory. Create with ``Run.create`` (writing) or ``Run.open`` (reading)."""

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any]):
        self.dir = Path(directory)
        self.config = config

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, out_dir: str | os.PathLike, config: Mapping[str, Any], resume: bool = False) -> "Run":
        """Start a run in ``out_dir`` (created if needed) and write ``config.json``.

        An existing non-empty ``out_dir`` is refused unless ``resume`` is true, in which case
        its ``config.json`` must match ``config`` on every analysis-defining key.
        """
        out = Path(out_dir)
        new = _normalize_config(config)
        extra = _RECORDED.get()
        if extra is not None:  # e.g. the CLI's --dtype and the weights' provenance
            new.update({k: v for k, v in _normalize_config(extra(new)).items() if k not in new})
        reserved = {"versions", "created_utc", "resumed_utc"} & set(new)
        if reserved:
            raise ValueError(f"config keys {sorted(reserved)} are reserved for Run")
        if check_out_dir(out, resume):  # resume
            cfg_path = out / CONFIG_FILE
            old = read_json(cfg_path)
            if not isinstance(old, dict):
                raise FactscopeError(f"{cfg_path} does not hold a JSON object")
            diffs = _config_differences(old, new)
            if diffs:
                raise FactscopeError(
                    f"cannot resume in {out}: its config differs from this command's in "
                    + "; ".join(diffs)
                    + ". Use the same options to resume, or choose another --out directory"
                )
            run = cls(out, old)
            run._remove_stale_temp_files()
            old.setdefault("resumed_utc", []).append(_utc_now())
            if isinstance(new.get("runtime"), dict):
                old["runtime"] = new["runtime"]
            run._write_config()
            return run
        top = out.absolute()  # the outermost directory this call creates (removed again if nothing is done)
        while not top.parent.exists():
            top = top.parent
        created = top if not top.exists() else None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FactscopeError(f"cannot create output directory {out}: {e.strerror or e}") from None
        full = dict(new)
        full["versions"] = collect_versions()
        full["created_utc"] = _utc_now()
        run = cls(out, full)
        run._write_config()
        _UNSTARTED.append((run, created))
        return run

    @classmethod
    def open(cls, out_dir: str | os.PathLike) -> "Run":
        """Open an existing run (for re-rendering its report or reading its results)."""
        out = Path(out_dir)
        if not out.is_dir():
            raise FactscopeError(f"{out} is not a directory (expected a factscope run directory)")
        cfg_path = out / CONFIG_FILE
        if not cfg_path.is_file():
            raise FactscopeError(f"{out} is not a factscope run: it has no {CONFIG_FILE}")
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise FactscopeError(f"{cfg_path} does not hold a JSON object")
        return cls(out, config)

    def _write_config(self) -> None:
        atomic_write_json(self.dir / CONFIG_FILE, self.config)

    def _remove_stale_temp_files(self) -> None:
        for d in (self.dir, self.dir / CHECKPOINT_DIR):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(_TMP_PREFIX) and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                        with contextlib.suppress(OSError):
                            p.unlink()

    # ---- paths -------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Path of a file in the run directory."""
        return self.dir / name

    def table_path(self, name: str) -> Path:
        return self.dir / (_check_name(_strip_ext(name, ".csv"), "table") + ".csv")

    def figure_path(self, name: str) -> Path:
        return self.dir / (_check_name(_strip_ext(name, ".png"), "figure") + ".png")

    # ---- tables ------------------------------------------------------------------------------

    def save_table(self, name: str, df: Any) -> Path:
        """Write ``df`` to ``DIR/name.csv`` atomically. A non-trivial index is kept as columns."""
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(df)
        path = self.table_path(name)
        trivial_index = isinstance(df.index, pd.RangeIndex) and df.index.name is None and df.index.start == 0 \
            and df.index.step == 1
        out = df if trivial_index else df.reset_index()
        # repr-precision floats (pandas default) so that load_table gives back the same numbers
        atomic_write_text(path, out.to_csv(index=False, lineterminator="\n"))
        return path

    def load_table(self, name: str) -> Any:
        """The table ``DIR/name.csv`` as a DataFrame, or None when it does not exist."""
        import pandas as pd

        path = self.table_path(name)
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path, keep_default_na=False, na_values=[""], **_exact_floats(pd))
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise FactscopeError(f"table {path} is malformed: {e}") from None

    def tables(self) -> list[str]:
        """Names of the tables in the run."""
        return sorted(p.stem for p in self.dir.glob("*.csv") if not p.name.startswith(_TMP_PREFIX))

    # ---- figures -----------------------------------------------------------------------------

    def save_figure(self, name: str, fig: Any, dpi: int = 130, interactive: bool = True) -> Path:
        """Write a matplotlib figure to ``DIR/name.png`` atomically and close it; its interactive copy
        (``interactive.to_plotly``) goes to ``DIR/name.plotly.json`` when the figure converts (and
        ``interactive``: False for figures with an interactive view of their own)."""
        from factscope.interactive import to_plotly

        path = self.figure_path(name)
        spec_path = path.with_suffix(".plotly.json")
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
            try:
                spec = to_plotly(fig) if interactive else None
            except Exception:  # a converter gap must never cost a run its figure: the PNG is shown
                spec = None
        finally:
            _close_figure(fig)
        atomic_write_bytes(path, buf.getvalue())
        if spec is not None:
            atomic_write_text(spec_path, json.dumps(spec, separators=(",", ":"), allow_nan=False))
        elif spec_path.exists():
            spec_path.unlink()
        return path

    def figures(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.png") if not p.name.startswith(_TMP_PREFIX))

    # ---- summary -----------------------------------------------------------------------------

    @property
    def summary(self) -> dict[str, Any]:
        path = self.dir / SUMMARY_FILE
        if not path.is_file():
            return {}
        data = read_json(path)
        return data if isinstance(data, dict) else {}

    def update_summary(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into ``DIR/summary.json`` (atomic); returns the merged summary."""
        merged = self.summary
        merged.update(to_jsonable(dict(values)))
        atomic_write_json(self.dir / SUMMARY_FILE, merged)
        return merged

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, name: str) -> Checkpoint:
        """The append-only checkpoint ``DIR/checkpoints/name.jsonl``."""
        name = _check_name(_strip_ext(name, ".jsonl"), "checkpoint")
        return Checkpoint(self.dir / CHECKPOINT_DIR / f"{name}.jsonl")

    # ---- report ------------------------------------------------------------------------------

    @property
    def sections(self) -> list[dict[str, Any]]:
        path = self.dir / SECTIONS_FILE
        if not path.is_file():
            return []
        data = read_json(path)
        if not isinstance(data, list):
            raise FactscopeError(f"{path} does not hold a list of sections")
        return data

    def add_section(
        self,
        key: str,
        title: str,
        text: str = "",
        figures: Iterable[str | Mapping[str, str]] = (),
        tables: Iterable[str | Mapping[str, str]] = (),
        findings: Iterable[str] = (),
        claims: Iterable[Any] = (),
    ) -> None:
        """Add (or replace, keeping its place) the report section ``key``.

        ``text`` is plain text: blank lines separate paragraphs, lines starting with ``- `` make
        a list, ``**bold**`` and ```code``` are rendered; everything else is escaped.
        ``figures``/``tables`` are names of this run's figures/tables (``"knockout"`` or
        ``"knockout.png"``), or dicts ``{"name": ..., "caption": ...}``.
        ``findings``: a few plain sentences computed from the results (the report's first screen);
        ``claims``: :class:`factscope.findings.Claim` objects or their dicts (the claims table).
        """
        from factscope.findings import Claim

        section = {
            "key": str(key),
            "title": str(title),
            "text": str(text or ""),
            "figures": [_item(f, ".png", "figure") for f in figures],
            "tables": [_item(t, ".csv", "table") for t in tables],
            "findings": [str(f) for f in findings],
            "claims": [Claim.from_dict(c).to_dict() for c in claims],
        }
        sections = self.sections
        for i, s in enumerate(sections):
            if s.get("key") == section["key"]:
                sections[i] = section
                break
        else:
            sections.append(section)
        atomic_write_json(self.dir / SECTIONS_FILE, sections)

    def write_report(self, title: str | None = None, static: bool = False) -> Path:
        """Render ``DIR/report.html`` (self-contained: figures inlined, no external resources;
        ``static``: PNG figures only)."""
        html = render_report(self, title=title, static=static)
        path = self.dir / REPORT_FILE
        atomic_write_text(path, html)
        return path

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"


def _exact_floats(pd: Any) -> dict[str, str]:
    """read_csv options for exact float round trips: pandas < 3 needs "round_trip"; pandas 3
    parses exactly by default and deprecates the option."""
    major = int(str(pd.__version__).split(".")[0])
    return {"float_precision": "round_trip"} if major < 3 else {}


def _item(entry: str | Mapping[str, str], ext: str, what: str) -> dict[str, str]:
    if isinstance(entry, Mapping):
        if "name" not in entry:
            raise ValueError(f"{what} entry {entry!r} needs a 'name'")
        name, caption = str(entry["name"]), str(entry.get("caption", "") or "")
    else:
        name, caption = str(entry), ""
    name = _check_name(_strip_ext(name, ext), what)
    return {"name": name, "caption": caption}


def _close_figure(fig: Any) -> None:
    """Close a pyplot-managed figure (frees memory); figures made with plotting.new_figure
    are not registered with pyplot and need nothing."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        with contextlib.suppress(Exception):
            plt.close(fig)

