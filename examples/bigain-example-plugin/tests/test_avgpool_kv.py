from bigain_example_plugin import AvgPoolKV

from bigain.testing import parametrize_with_checks


@parametrize_with_checks([AvgPoolKV(), AvgPoolKV(factor=4)])
def test_conformance(compressor, check):
    check(compressor)
