"""`python -m qpruner.prune --config X`: prune once (as a Ray task, cached) and say where the model went."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qpruner.cli import base_parser, load_cli_config, set_offline_defaults

    set_offline_defaults(argv)
    parser = base_parser("python -m qpruner.prune", "Prune a model once (cached) and store it in Hugging Face format.")
    args = parser.parse_args(argv)
    from qpruner.model import check_model
    from qpruner.plan import resolve_config, worker_env

    cfg = resolve_config(load_cli_config(args))
    check_model(cfg.model.name, cfg.output.cache, cfg.model.trust_remote_code, cfg.model.allow_pickle)  # before Ray starts

    import ray

    from qpruner.prune import prune_with_ray

    # log_to_driver: the worker's progress bar shows here
    ray.init(include_dashboard=False, configure_logging=False, runtime_env={"env_vars": worker_env(cfg)})
    try:
        result = prune_with_ray(cfg, progress=True)
    finally:
        ray.shutdown()
    print(f"pruned model: {result.path}")
    print(f"parameters:   {result.params_before:,} -> {result.params_after:,} "
          f"(overall {result.overall_ratio:.1%}, per prunable block {result.block_ratio:.1%})")
    if result.sparsity:
        sp = result.sparsity
        print(f"sparsity:     {sp['spec']} -> {sp['zeros']:,} of {sp['weights']:,} decoder Linear weights are zero "
              f"({sp['zeros'] / sp['weights']:.4%}), stored {sp['storage']}")
    print(f"time:         {result.seconds:.1f} s when built" + (" (cached: reused, nothing pruned now)" if result.cached else " (built now)"))
    return 0


if __name__ == "__main__":
    from qpruner.cli import run_cli

    run_cli(main)
