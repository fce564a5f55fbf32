"""The engine registry (bench.engines.REGISTRY) and what reads it: the job matrix's rules, the
packages checked up front, the report's order and speed-up baseline."""

from bench.engines import BASELINE_ENGINE, ENGINE_INFO, ENGINES, REGISTRY, Engine
from study.requirements import SPARSIFY_PACKAGES


def test_every_engine_is_checked_for_up_front_and_one_is_the_baseline():
    assert ENGINES == tuple(ENGINE_INFO) == tuple(e.name for e in REGISTRY) == ("deepsparse", "onnxruntime", "openvino")
    assert all(isinstance(engine, Engine) and type(engine).open is not Engine.open for engine in REGISTRY)
    assert {engine.package for engine in ENGINE_INFO.values()} <= set(SPARSIFY_PACKAGES)
    assert [name for name, engine in ENGINE_INFO.items() if engine.baseline] == [BASELINE_ENGINE] == ["onnxruntime"]
    assert len({engine.display_order for engine in ENGINE_INFO.values()}) == len(ENGINE_INFO)


def test_report_orders_rows_by_model_then_engine_display_order():
    from report.tables import _BENCH_ORDER

    from report.tables import bench_order

    shown = sorted(_BENCH_ORDER, key=_BENCH_ORDER.get)
    engines = ["onnxruntime", "deepsparse", "openvino"]
    assert shown == [(m, e) for m in ("dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq")
                     for e in engines]
    # targets by sparsity, the untagged one (the recipe's own) as 80 %; the QDQ export after the ConvInteger one
    models = ["pruned_quantized_s90", "pruned_quantized_qdq_s50", "pruned", "dense_int8", "pruned_s50", "dense",
              "pruned_quantized_qdq", "pruned_quantized_s50"]
    assert sorted(models, key=lambda m: bench_order(m, "deepsparse")) == [
        "dense", "dense_int8", "pruned_s50", "pruned_quantized_s50", "pruned_quantized_qdq_s50", "pruned",
        "pruned_quantized_qdq", "pruned_quantized_s90"]
