from typing import Any, Callable, Optional

__version__: str

def optimize(
    settings: str,
    out: str,
    on_event: Callable[[str, str], Any],
    size: Optional[str] = None,
    preset: Optional[str] = None,
    resume: bool = False,
    steps: Optional[int] = None,
) -> str: ...
def evaluate(settings: str, prompt: str, on_event: Callable[[str, str], Any], size: Optional[str] = None) -> str: ...
def defaults(size: Optional[str] = None) -> str: ...
def protocol(
    settings: str,
    tasks: list[str],
    out: str,
    on_event: Callable[[str, str], Any],
    methods: Optional[list[str]] = None,
    baseline_tasks: Optional[int] = None,
    transfer_to: Optional[str] = None,
    size: Optional[str] = None,
    preset: Optional[str] = None,
    shard: Optional[tuple[int, int]] = None,
    resume: bool = False,
) -> str: ...
def screen(
    settings: str,
    tasks: list[str],
    out: str,
    on_event: Callable[[str, str], Any],
    configurations: Optional[list[tuple[str, str]]] = None,
    file: Optional[str] = None,
    size: Optional[str] = None,
    preset: Optional[str] = None,
    resume: bool = False,
) -> str: ...

def export(run: str, to: str, out: Optional[str] = None) -> str: ...
def read_run(path: str) -> str: ...
