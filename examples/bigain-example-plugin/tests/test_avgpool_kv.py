from bigain_example_plugin import AvgPoolKV

from bigain.testing import check_compressor


def test_conformance():
    assert "exact-restore" in check_compressor(AvgPoolKV)
