from bench.report import result_line


def test_ratio_oriented_so_higher_is_better():
    assert result_line("x", 200, 100, "tok/s") == "RESULT x fastserve=200 tok/s reference=100 tok/s ratio=2.000"
    assert result_line("lat", 50, 100, "ms", higher_is_better=False).endswith("ratio=2.000")
