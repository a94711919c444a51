"""`splitserve serve --autoscale ...`: bad settings are a one-line error before anything
starts (no Ray, no traceback); the autoscaler is off unless asked for."""

from __future__ import annotations

import pytest

from splitserve.cli import build_parser, main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--min-decode 3 --max-decode 2", "decode: min workers (3) above max (2)"),
        ("--min-prefill 0", "prefill: min workers must be at least 1"),
        ("--ttft-target-ms 0", "the TTFT target must be a number above 0"),
        ("--tpot-target-ms -5", "the TPOT target must be a number above 0"),
        ("--slo-percentile 42", "SLO percentile must be one of 50, 90, 95, 99"),
        ("--mode colocated", "--autoscale needs --mode disaggregated"),
        ("--decode 5", "--decode 5 is outside the autoscaler's bounds 1-4"),
        ("--load-predictor arima", "unknown load predictor 'arima'"),
    ],
)
def test_bad_autoscaler_settings_are_one_line_errors(flags, message, capsys):
    assert main(["serve", "--autoscale", *flags.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_autoscaler_is_off_by_default():
    from router.autoscale_args import autoscale_config

    assert autoscale_config(build_parser().parse_args(["serve"])) is None
    on = autoscale_config(build_parser().parse_args(["serve", "--autoscale", "--max-decode", "3"]))
    assert on is not None and on.decode.max_workers == 3 and on.percentile == 90.0
