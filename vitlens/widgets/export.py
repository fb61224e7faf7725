"""Export of a widget's current view: the "Save as" box, confined to one export directory.

The box is what a notebook's (or a Voila page's) *user* types into, so it takes
a bare file name only: no path separators, no ``..``, no absolute path, no
hidden file, and an existing file is never replaced unless "overwrite" is
ticked. The directory it writes into is set in code (``export_dir=``). From
Python, ``widget.save(path)`` writes anywhere the caller asks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import ipywidgets as widgets

from ..errors import ExportError, VitlensError
from .text import html_text, markup

#: File types a widget exports (matplotlib, no browser involved).
EXPORT_FORMATS = ("png", "svg", "pdf")


def export_target(name: str, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Where the "Save as" box may write ``name``: a plain file name inside ``directory``.

    Raises :class:`~vitlens.errors.ExportError` (saying what to type instead) for
    an empty name, a path (separators, ``..``, absolute, a drive), a hidden file,
    another file type than PNG/SVG/PDF, a link, or an existing file when
    ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> export_target("view.png", d).name
    'view.png'
    >>> export_target("../view.png", d)
    Traceback (most recent call last):
    ...
    vitlens.errors.ExportError: '../view.png': type a file name only (like 'view.png'); exports go into the export directory ...
    """
    raw = str(name)
    name = raw.strip()
    if not name:
        raise ExportError("type a file name, like 'view.png'.")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (any(s in name for s in seps) or name in (".", "..") or ":" in name or "\0" in name
            or Path(name).is_absolute()):
        raise ExportError(f"{raw!r}: type a file name only (like 'view.png'); exports go into the export directory "
                          f"{str(directory)!r}, set in code with export_dir=.")
    if name.startswith("."):
        raise ExportError(f"{raw!r}: a file name cannot start with '.'; type a name like 'view.png'.")
    fmt = Path(name).suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"{raw!r}: end the name with .png, .svg or .pdf.")
    folder = Path(directory).resolve()
    path = folder / name
    if path.parent != folder:  # defence in depth: the name stays one entry of the folder
        raise ExportError(f"{raw!r}: type a file name only.")
    if path.is_symlink():
        raise ExportError(f"{name!r} in {str(folder)!r} is a link; choose another name.")
    if path.exists() and not overwrite:
        raise ExportError(f"{name!r} already exists in {str(folder)!r}; choose another name or tick 'overwrite'.")
    if path.exists() and not path.is_file():
        raise ExportError(f"{name!r} in {str(folder)!r} is not a file; choose another name.")
    return path


class ExportControls:
    """The "Save as" text box, an "overwrite" tick box, the Export button and a status line.

    ``write(path)`` is the widget's ``save``; the button calls it with
    :func:`export_target` of the typed name in ``directory`` (created on first
    use if it is missing).
    """

    def __init__(self, write: Callable[[Path], Path], directory: str | os.PathLike | None, default_name: str) -> None:
        self.write = write
        self.directory = Path.cwd() if directory is None else Path(directory)
        self.filename = widgets.Text(value=default_name, description="Save as", layout=widgets.Layout(width="260px"),
                                     tooltip=f"a .png, .svg or .pdf file name, written into {self.directory}")
        self.filename.add_class("vitlens-filename")
        self.overwrite = widgets.Checkbox(value=False, description="overwrite", indent=False,
                                          layout=widgets.Layout(width="auto", margin="0 8px"))
        self.overwrite.add_class("vitlens-overwrite")
        self.button = widgets.Button(description="Export", tooltip="write the current view (.png, .svg, .pdf)",
                                     layout=widgets.Layout(width="80px"))
        self.button.add_class("vitlens-export")
        self.button.on_click(lambda _: self.export())
        self.status = html_text(css="vitlens-export-status", margin="0 8px")
        self.box = widgets.HBox([self.filename, self.overwrite, self.button, self.status],
                                layout=widgets.Layout(align_items="center", flex_flow="row wrap"))

    def export(self) -> Path | None:
        """What the button does: check the name, write, and say what happened."""
        try:
            if not self.directory.exists():
                self.directory.mkdir(parents=True)
            path = export_target(self.filename.value, self.directory, overwrite=self.overwrite.value)
            written = self.write(path)
        except (VitlensError, OSError) as exc:
            self.status.value = markup("<span style='color:#b00'>{}</span>", exc)
            return None
        self.status.value = markup("saved {}", written)
        return written
