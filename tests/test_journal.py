"""Raw-data journal: write-ahead stream, .h5 copy, recovery of a crashed session's stream."""

import ismrmrd
import numpy as np

from inline.journal import Journal, journal_info, recover
from inline.mrdfile import read_scan
from inline.protocol import ConfigFile, Header


def test_journal_keeps_everything_and_converts(tmp_path, small_scan):
    scan = read_scan(small_scan)
    j = Journal(tmp_path, "s1")
    j.record(ConfigFile("default"))
    j.record(Header(scan.header_xml))
    for a in scan.items:
        j.record(a)
    j.note_config(config="default", parameters={"method": "walsh"})
    h5 = j.close()
    back = read_scan(h5)
    assert back.header_xml == scan.header_xml
    assert len(back.items) == len(scan.items)
    for a, b in zip(scan.acquisitions, back.acquisitions):
        assert bytes(a.getHead()) == bytes(b.getHead())
        np.testing.assert_array_equal(a.data, b.data)
    assert journal_info(h5) == {"config": "default", "parameters": {"method": "walsh"}}
    # readable by the ismrmrd package itself
    ds = ismrmrd.Dataset(str(h5), "dataset", create_if_needed=False)
    assert ds.number_of_acquisitions() == len(scan.acquisitions)
    ds.close()


def test_recover_converts_a_stream_cut_mid_message(tmp_path, small_scan):
    scan = read_scan(small_scan)
    j = Journal(tmp_path, "crashed")
    j.record(Header(scan.header_xml))
    for a in scan.items[:20]:
        j.record(a)
    j.close(convert=False)
    # the process died while the 21st acquisition was being written
    with open(tmp_path / "crashed.mrd", "ab") as f:
        f.write(scan.items[20].to_bytes()[:100])
    recovered = recover(tmp_path)
    assert [p.name for p in recovered] == ["crashed.h5"]
    assert len(read_scan(recovered[0]).items) == 20
    assert recover(tmp_path) == []  # already converted
