"""The engine registry (bench.benchmark.ENGINE_INFO) and what reads it: the job matrix's rules, the
packages checked up front, the report's order and speed-up baseline."""

from bench.benchmark import BASELINE_ENGINE, ENGINE_INFO, ENGINES
from study.requirements import SPARSIFY_PACKAGES


def test_every_engine_is_checked_for_up_front_and_one_is_the_baseline():
    assert ENGINES == tuple(ENGINE_INFO) == ("deepsparse", "onnxruntime")
    assert {engine.package for engine in ENGINE_INFO.values()} <= set(SPARSIFY_PACKAGES)
    assert [name for name, engine in ENGINE_INFO.items() if engine.baseline] == [BASELINE_ENGINE] == ["onnxruntime"]
    assert len({engine.display_order for engine in ENGINE_INFO.values()}) == len(ENGINE_INFO)


def test_report_orders_rows_by_model_then_engine_display_order():
    from report.tables import _BENCH_ORDER

    shown = sorted((k for k in _BENCH_ORDER if k[0] == "dense" or ENGINE_INFO[k[1]].sparse), key=_BENCH_ORDER.get)
    assert shown == [("dense", "onnxruntime"), ("dense", "deepsparse"), ("pruned", "deepsparse"),
                     ("pruned_quantized", "deepsparse")]
