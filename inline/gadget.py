"""The gadget contract: what a stage of a reconstruction chain is.

Modelled on Gadgetron's ``Node``/``PureGadget``/``ChannelGadget`` split:

* a gadget declares the message types it ``accepts`` and ``emits``; every other message
  passes through it unchanged (the chain engine does this, the gadget never sees them);
* its tunables are declared once, as a pydantic model ``Params`` (name with unit, type,
  default, description). That one declaration feeds config validation, ``inline gadgets``
  and the docs;
* :class:`PureGadget` is a per-message transform with no state between messages;
  :class:`AccumulatingGadget` keeps state across messages and emits when triggered
  (accumulate-and-trigger, noise statistics, calibration).

Every message travels with a :class:`~inline.trace.Trace`; a pure gadget's output inherits
its input's trace, an accumulating gadget merges the traces of what it consumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

from pydantic import BaseModel, ConfigDict

from inline.trace import Trace

#: What a gadget yields: a payload and the trace of the raw data it was made from.
Output = tuple[Any, Trace]


class GadgetParams(BaseModel):
    """Base of every gadget's parameter model: unknown names are errors, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Text(str):
    """A text message for the scanner (MRD TEXT, id 5).

    Gadgets emit it to report something to the operator; it passes through the rest of the
    chain and is sent as is. Use FIRE-style level prefixes (``INFO    ``, ``WARNING ``,
    ``ERROR   ``), see :func:`text_message`.
    """


def text_message(level: str, message: str) -> Text:
    """A :class:`Text` with a FIRE-style, 8-column level prefix (``"ERROR   disk full"``)."""
    return Text(f"{level.upper():<8}{message}")


@dataclass
class SessionContext:
    """What a gadget may know of the session it runs in.

    Attributes:
        header: the ISMRMRD XML header of the scan (``ismrmrd.xsd.ismrmrdHeader``).
        session_id: unique id of the connection or offline run, used in logs and journals.
        config_name: name of the chain config the session runs.
        log: logger that tags lines with the session id.
        shared: facts one gadget finds for others of the same session (e.g. the noise
            statistics of the noise scan, keyed ``"noise"``); written once, read later.
    """

    header: Any
    session_id: str = "offline"
    config_name: str = ""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("inline.session"))
    shared: dict = field(default_factory=dict)


class Gadget:
    """Base of every stage. Subclass :class:`PureGadget` or :class:`AccumulatingGadget`.

    Class attributes:
        Params: pydantic model of the tunables (subclass of :class:`GadgetParams`).
        accepts: message types :meth:`process` is called with; others bypass the gadget.
        emits: message types the gadget may yield (documentation and ``inline gadgets``).
        tap: True for gadgets that only inspect (QC): they never delay the data path.
        moves_arrays_to: "device" / "host" for stages that move arrays between memories.
    """

    Params: ClassVar[type[GadgetParams]] = GadgetParams
    accepts: ClassVar[tuple[type, ...]] = ()
    emits: ClassVar[tuple[type, ...]] = ()
    #: A tap (QC) runs beside the data path on its own thread: the engine forwards every
    #: message at once and keeps only what the tap finds (see ChainRunner._work_tap).
    tap: ClassVar[bool] = False
    #: "device" or "host" for a stage that moves the arrays it passes on (ToDevice on a GPU,
    #: ToHost); taps after a move to the device stay on a thread of the server.
    moves_arrays_to: ClassVar[str | None] = None

    def __init__(self, context: SessionContext, params: GadgetParams | None = None):
        self.context = context
        self.header = context.header
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{type(self).__name__} expects {self.Params.__name__}, got {type(self.params).__name__}")

    @property
    def log(self) -> logging.Logger:
        return self.context.log

    def process(self, item: Any, trace: Trace) -> Iterable[Output]:
        """Handle one accepted message; yield ``(payload, trace)`` pairs."""
        raise NotImplementedError

    def close(self) -> Iterable[Output]:
        """End of stream: yield whatever is still held. Called once."""
        return ()


class PureGadget(Gadget):
    """A stateless per-message transform: :meth:`apply` maps one message to zero or one message.

    The output carries the input's trace.
    """

    def apply(self, item: Any) -> Any | None:
        """Return the transformed message, or None to drop it."""
        raise NotImplementedError

    def process(self, item: Any, trace: Trace) -> Iterator[Output]:
        out = self.apply(item)
        if out is not None:
            yield out, trace


class AccumulatingGadget(Gadget):
    """A stage that keeps state across messages and emits when triggered.

    Implement :meth:`process` (and :meth:`close` to flush at end of stream); merge the
    traces of the messages an output was made from with :meth:`Trace.merge_all`.
    """
