"""The text tables the commands print: plain strings from results, so that the commands
stay small and the layout is in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from model.kfold import KFoldResult
    from study.budget import StudyCounts
    from study.presets import Preset


def train_table(result: KFoldResult) -> str:
    """`train`'s table: the configuration, one row per fold, the mean."""
    config = result.config
    # The settings past the report's, named only where they are on.
    extras = [
        f"input_dropout {config.input_dropout:g}" if config.input_dropout else "",
        f"max_norm {config.max_norm:g}" if config.max_norm is not None else "",
        f"schedule {config.schedule}" if config.schedule != "constant" else "",
        f"label_smoothing {config.label_smoothing:g}" if config.label_smoothing else "",
    ]
    lines = [
        f"{'-'.join(map(str, (784, *config.hidden, 10)))} {config.activation} "
        f"dropout {config.dropout:g} {config.optimizer} lr {config.lr:g} "
        f"weight_decay {config.weight_decay:g} "
        f"batch {'full' if config.full_batch else config.batch_size}"
        + "".join(f" {extra}" for extra in extras if extra),
        f"{'fold':>4}  {'accuracy':>8}  {'val loss':>8}  {'best epoch':>10}  {'epochs':>6}",
    ]
    for j in range(config.k):
        lines.append(
            f"{j + 1:>4}  {result.fold_accuracies[j]:>8.4f}  {result.fold_losses[j]:>8.4f}  "
            f"{result.best_epochs[j]:>10d}  {result.epochs_run[j]:>6d}"
        )
    lines.append(
        f"mean accuracy {result.mean_accuracy:.4f} ± {result.std_accuracy:.4f} "
        f"({config.k} folds, {result.seconds:.1f} s on {result.device})"
    )
    if result.diverged:
        lines.append(f"diverged: {result.diverged}")
    return "\n".join(lines)


def space_summary(preset: Preset, draws: list[dict[str, Any]], seed: int) -> str:
    """`space`'s table: each parameter's draws beside what its prior says. A conditional
    parameter is summed up over the draws that asked for it, and says how many did."""
    import statistics

    from optuna.distributions import IntDistribution

    space = preset.space
    priors = space.priors()
    moments = space.prior_moments()
    conditions = space.conditions()
    width = max(13, *(len(name) + 1 for name in space.distributions()))
    lines = [
        f"preset {preset.name}: {len(draws)} draws, seed {seed}",
        f"{'parameter':<{width}} {'mean':>10} {'sd':>10} {'min':>10} {'max':>10}   prior",
    ]
    for name, distribution in space.distributions().items():
        values = [d[name] for d in draws if name in d]
        condition = conditions.get(name)
        asked = ""
        if condition is not None:
            asked = f"   (in {len(values)} of {len(draws)} draws: {condition.text()})"
        if not values:
            lines.append(f"{name:<{width}} never drawn{asked}")
            continue
        if hasattr(distribution, "choices"):
            counts = ", ".join(f"{c} {values.count(c)}" for c in distribution.choices)
            expected = len(values) / len(distribution.choices)
            lines.append(f"{name:<{width}} {counts}   uniform: {expected:.1f} each{asked}")
            continue
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        stats = (statistics.fmean(values), sd, min(values), max(values))
        row = f"{name:<{width}} " + " ".join(f"{v:>10.4g}" for v in stats)
        prior = moments[name]
        # A neuron count's prior in hundredths (hundreds of units); the rest as lr's 1e-4.
        counted = name in priors and isinstance(distribution, IntDistribution)
        shown = ".2f" if counted else ".4g"
        row += f"   {prior.kind}: mean {prior.mean:{shown}}, sd {prior.sd:{shown}}{asked}"
        lines.append(row)
    return "\n".join(lines)


def status_block(name: str, study: optuna.Study, counts: StudyCounts) -> str:
    """A study's progress against its budget and its best trial, as `status` and `run` print it."""
    attrs = study.user_attrs
    lines = [
        f"study {name}: preset {attrs.get('preset')}, seed {attrs.get('seed')}",
    ]
    space = attrs.get("space")
    if isinstance(space, dict):
        # The stored space's parameters; the whole file: `status --json`, or the report.
        stored = " (stored study file)" if "study_file" in attrs else ""
        lines.append(f"  space   {', '.join(space)}{stored}")
    lines += [
        f"  trials  {counts.finished}/{counts.budget} finished ({counts.complete} complete, "
        f"{counts.pruned} pruned, {counts.failed} failed), {counts.running} running, "
        f"{counts.waiting} queued, {counts.retried} retried",
    ]
    if counts.running:
        from study.progress import running_trials
        from study.studies import study_preset

        defaults = study_preset(study).defaults
        for trial in running_trials(study):
            lines.append(f"  running {trial.text(defaults.max_epochs, defaults.k)}")
    best = counts.best
    if best is None:
        lines.append("  best    none yet")
        return "\n".join(lines)
    sd = best.user_attrs.get("accuracy_sd")
    spread = f" ± {sd:.4f}" if isinstance(sd, float) else ""
    lines.append(f"  best    trial {best.number}: mean CV accuracy {best.value:.4f}{spread}")
    for key, value in best.params.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"          {key} = {shown}")
    retrained = attrs.get("retrained_trial", best.number)  # older studies did not say
    if "test_accuracy" in attrs and retrained == best.number:
        lines.append(
            f"  test    accuracy {attrs['test_accuracy']:.4f} after retraining "
            f"(checkpoint {attrs.get('checkpoint')})"
        )
    elif "test_accuracy" in attrs:
        lines.append(
            f"  test    trial {retrained} was retrained (accuracy {attrs['test_accuracy']:.4f}); "
            "the best trial has changed since: retrain again"
        )
    return "\n".join(lines)
