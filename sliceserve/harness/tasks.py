"""lm-eval's tasks by name, loaded before any model is, so that an unknown name or a data set
that cannot be downloaded ends the run at once, in one line."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from pathlib import Path

from lm_eval.tasks import TaskManager

from sliceserve.errors import SliceserveError

HUB_NOTE = "lm-eval downloads its data sets from the Hugging Face Hub: this needs the network, or a copy in its cache"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # data sets read from local files


def task_manager(names: list[str], include_path: str | Path | None) -> TaskManager:
    """Indexing lm-eval's own 14,000 task files takes some 20 s on a small CPU: where every
    name is one of --include-path's tasks, only that folder is indexed."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SliceserveError(f"--include-path {include_path} is not a folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def load_tasks(names: list[str], include_path: str | Path | None = None) -> tuple[TaskManager, list]:
    """The task manager and the built tasks, groups or tags' tasks, in the order asked."""
    if not names:
        raise SliceserveError("no task given: --tasks piqa,arc_easy,...")
    manager = task_manager(names, include_path)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SliceserveError(f"unknown task {name!r}{hint}; --include-path DIR adds task files of your own")
    built = []
    for name in names:
        try:
            with hub_warnings_silenced():
                loaded = manager.load(name)
        except Exception as error:  # the data set's download or cache, mostly: say which, in one line
            raise SliceserveError(f"task {name}: {dataset_problem(manager, name, error)}") from None
        item = loaded["groups"].get(name, loaded["tasks"].get(name))
        built += [item] if item is not None else list(loaded["tasks"].values())  # a tag: its tasks
    return manager, built


@contextlib.contextmanager
def hub_warnings_silenced() -> Iterator[None]:
    """Without a network the Hub client warns of every retry, some ten lines before the error
    that says the same once."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def dataset_problem(manager: TaskManager, name: str, error: Exception) -> str:
    entry = manager.task_index.get(name)
    dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
    reason = " ".join(str(error).split()) or type(error).__name__
    if dataset is None:
        return f"could not be loaded: {reason}"
    note = "" if dataset in LOCAL_BUILDERS else f" ({HUB_NOTE})"
    return f"could not load its data set {dataset}: {reason}{note}"
