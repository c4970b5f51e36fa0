"""Opening storage and studies: SQLAlchemy URLs into Optuna RDB storage with heartbeats, a
study created or resumed with the run's sampler, and loading one for read-back commands."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import optuna

from tuner.config import SearchSpace
from tuner.errors import ConfigError
from tuner.log import Log
from tuner.storage.attrs import STUDY_ATTR_SPACE
from tuner.storage.resume import resume_changes, space_record

HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
# A database server that does not answer is one line after this long, not a hang until the
# kernel gives up on TCP (minutes). The URL's own connect_timeout wins.
CONNECT_TIMEOUT_S = 5


def sqlite_file(url: str) -> Path | None:
    """The database file a `sqlite:///` URL names (its query string aside); None for other
    schemes and in-memory databases."""
    import sqlalchemy.engine

    if not url.startswith("sqlite"):
        return None
    try:
        database = sqlalchemy.engine.make_url(url).database
    except Exception:  # a malformed URL is make_storage's to report
        return None
    return Path(database) if database and database != ":memory:" else None


def _without_password(url: str) -> str:
    import sqlalchemy.engine

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://…"


def require_database(url: str) -> None:
    """For commands that only read: a SQLite file that does not exist is an error (opening it
    would create an empty database)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise ConfigError(f"--study: no study database at {path}; run `kttune run` first, "
                          "or point --studies-dir / --storage at the study")


def default_storage(study_name: str, studies_dir: Path, *, create: bool = True) -> str:
    """`sqlite:///<studies_dir>/<study>.db`; the folder is made only when `create` (a run)."""
    if create:
        studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{studies_dir / (study_name + '.db')}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so a dead worker's RUNNING trial is failed, not lost.

    KTTUNE_HEARTBEAT_S sets the heartbeat interval in whole seconds (default 30); a trial whose
    heartbeat is older than 4 intervals counts as dead. Several workers may open a new database
    at once: the schema creation that loses that race is retried."""
    import time

    import sqlalchemy.exc

    if "://" not in url:  # (no URL, so no password to hide)
        raise ConfigError(f"--storage: {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///studies/x.db or postgresql://user@host/db")
    raw = os.environ.get("KTTUNE_HEARTBEAT_S", "").strip()
    interval = HEARTBEAT_INTERVAL_S
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"KTTUNE_HEARTBEAT_S: must be a whole number of seconds ≥ 1, got {raw!r}")
        interval = int(raw)
    grace = interval * HEARTBEAT_GRACE_S // HEARTBEAT_INTERVAL_S
    url, engine_kwargs = _engine_args(url)
    scheme = url.split("://")[0]
    shown = _without_password(url)  # messages end up in terminals and CI logs
    attempt = 0
    while True:
        attempt += 1
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=copy.deepcopy(engine_kwargs), heartbeat_interval=interval,
                                              grace_period=grace)
        except ImportError as exc:
            hint = "psycopg2-binary" if scheme.startswith("postgresql") else "the driver it names"
            raise ConfigError(f"--storage: the driver for {scheme} is not installed ({exc}); pip install {hint}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                optuna.exceptions.StorageInternalError) as exc:
            # Another worker created the tables or the version row between our check and our
            # insert; a second look finds them. Anything else (e.g. no right to create tables) stays.
            if attempt < 5:
                time.sleep(0.2 * attempt)
                continue
            raise ConfigError(f"--storage: cannot set up the tables in {shown!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); the database user must own the database") from None
        except Exception as exc:  # sqlalchemy raises many kinds for a bad URL / unreachable server
            raise ConfigError(f"--storage: cannot open {shown!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); check the URL and that the database is reachable") from None


def _engine_args(url: str) -> tuple[str, dict[str, Any]]:
    """The URL with the installed driver, and the engine options for it."""
    import importlib.util

    # A server on another host may drop idle connections during a long trial: test before use.
    engine_kwargs: dict[str, Any] = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    scheme = url.split("://")[0]
    if scheme.split("+")[0] in ("postgresql", "mysql") and "connect_timeout" not in url:
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        # SQLAlchemy ≥ 2.1 reads a bare postgresql:// as psycopg 3; use psycopg2 if that is what is installed.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url, engine_kwargs


def check_reachable(url: str) -> None:
    """Connect once and leave, writing nothing: a database server that is down or does not
    answer is refused before a run spends minutes on its checks. SQLite files are local."""
    if url.startswith("sqlite") or "://" not in url:
        return
    import sqlalchemy

    driver_url, engine_kwargs = _engine_args(url)
    engine_kwargs.pop("pool_pre_ping", None)
    try:
        engine = sqlalchemy.create_engine(driver_url, **engine_kwargs)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as exc:
        raise ConfigError(f"--storage: the driver for {url.split('://')[0]} is not installed ({exc}); "
                          "pip install psycopg2-binary (or the driver it names)") from None
    except Exception as exc:  # sqlalchemy raises many kinds for a bad URL / unreachable server
        raise ConfigError(f"--storage: cannot reach {_without_password(driver_url)!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); check the URL and that the database is up") from None


def open_study(space: SearchSpace, *, study_name: str, storage: str | optuna.storages.BaseStorage,
               sampler: optuna.samplers.BaseSampler, log: Log | None = None) -> optuna.Study:
    """Create or resume the study of `space` with the run's `sampler`. A resumed study whose
    stored space differs is refused (ConfigError, nothing written) or, where its finished trials
    stay valid, resumed with one line per change to `log`."""
    store = make_storage(storage) if isinstance(storage, str) else storage
    study = optuna.create_study(study_name=study_name, storage=store, directions=space.directions,
                                sampler=sampler, load_if_exists=True)
    if len(study.directions) != len(space.objectives):
        raise ConfigError(f"--study: {study_name!r} already exists with {len(study.directions)} objective(s), the space has {len(space.objectives)}; use another --study name")
    stored = study.user_attrs.get(STUDY_ATTR_SPACE)
    record = space_record(space)
    if isinstance(stored, dict):  # a resumed study
        for note in resume_changes(stored, space, study, study.get_trials(deepcopy=False)):
            (log or print)(f"resuming with a changed space: {note}")
    if stored != record:
        study.set_user_attr(STUDY_ATTR_SPACE, record)
    return study


def load_study(study_name: str, storage: str) -> optuna.Study:
    """An existing study, for commands that only read: a SQLite file that does not exist is an
    error (opening it would create an empty database), as is a study the storage lacks."""
    require_database(storage)
    store = make_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        hint = f" (it has: {', '.join(names)})" if names else ""
        raise ConfigError(f"--study: no study {study_name!r} in {storage}{hint}; run `kttune run` first or pass --study") from None
