"""Hooks installed on a model for the length of a ``with`` block, and the one place they are removed."""

from __future__ import annotations

from typing import Any


class HookSet:
    """Torch hook handles held for a ``with`` block: entering installs them (:meth:`_install`);
    leaving, or a failure while installing, removes every one (:meth:`_remove`).

    Subclasses append each handle to ``self._handles`` in :meth:`_install` and extend
    :meth:`_remove` with whatever else they restore (:class:`~vitlens.capture.hooks.Recorder`,
    :class:`~vitlens.capture.interventions.Intervening`).
    """

    _handles: list[Any]

    def __enter__(self) -> Any:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _install(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
