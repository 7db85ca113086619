"""Gadgets used only by tests (named in CONFIG_TEXT as ``toy_gadgets:Name``)."""

import ismrmrd

from inline.gadget import PureGadget


class FailOnLine(PureGadget):
    """Raises on the acquisition with kspace_encode_step_1 == 10."""

    accepts = (ismrmrd.Acquisition,)
    emits = (ismrmrd.Acquisition,)

    def apply(self, acq):
        if acq.idx.kspace_encode_step_1 == 10:
            raise ValueError("cannot handle line 10")
        return acq


class SlowOnLine(PureGadget):
    """Sleeps 50 ms on the acquisition with kspace_encode_step_1 == 5 (a latency-budget overrun)."""

    accepts = (ismrmrd.Acquisition,)
    emits = (ismrmrd.Acquisition,)

    def apply(self, acq):
        if acq.idx.kspace_encode_step_1 == 5:
            import time

            time.sleep(0.05)
        return acq
