"""Which pretraining digits helped or hurt each finetuned prediction?

Pretrain a small MLP on digits 0–4 (some labels corrupted on purpose), finetune it on digits 5–9
with the backbone frozen (``mode=fixed``) or tied to the pretrained one (``mode=updated``), and let
``MultiStageInfluence`` score every (pretraining example, query) pair. Positive scores are harmful
(upweighting the pretraining example raises the query's loss), negative ones helpful.

    python examples/digits/run.py                      # W&B offline, fixed mode
    python examples/digits/run.py mode=updated alpha=1 logger=csv
"""
from __future__ import annotations

import time
import warnings
from typing import Union

import hydra
from hydra.utils import instantiate
import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_msif import SnapshotDir, register_configs
from lightning_msif.demo import DigitsClassifier, DigitsDataModule, DigitsDataset, EpochProgress

warnings.filterwarnings("ignore", ".*does not have many workers.*")
register_configs()  # the `msif/pretrain` and `msif/finetune` schemas the YAML's defaults list names


def make_logger(cfg: DictConfig, stage: str) -> Union[Logger, bool]:
    """One offline W&B run (or CSV log) per stage, with the whole config attached."""
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        logger: Logger = CSVLogger(save_dir=cfg.log_dir, name=stage)
    elif cfg.logger == "wandb":
        logger = WandbLogger(project=cfg.wandb.project, name=stage, job_type=stage, mode="offline",
                             save_dir=cfg.log_dir, settings=wandb.Settings(quiet=True))
    else:
        raise ValueError(f"logger must be wandb, csv or none, got {cfg.logger!r}.")
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def finish(logger: Union[Logger, bool]) -> None:
    """Close a W&B run (``WandbLogger.finalize`` does not), so the next stage starts its own."""
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


def fit(cfg: DictConfig, stage: str, module: L.LightningModule, dm: L.LightningDataModule,
        callback: L.Callback) -> float:
    """Train one stage on CPU; returns its wall time in seconds."""
    logger = make_logger(cfg, stage)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=cfg[stage].max_epochs, logger=logger,
                        callbacks=[EpochProgress(f"[{stage}] training"), callback], enable_checkpointing=False,
                        deterministic=True, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    print(f"[{stage}] {seconds:.1f} s, val_acc {trainer.callback_metrics['val_acc']:.3f}")
    finish(logger)
    return seconds


def describe(data: DigitsDataset, i: int) -> str:
    """'#i digit d', with the true digit when the label was corrupted."""
    label = data.class_names[int(data.targets[i])]
    if bool((data.corrupted_indices == i).any()):
        return f"#{i:<4d} labelled {label}, truly {data.class_names[int(data.clean_targets[i])]} (CORRUPTED)"
    return f"#{i:<4d} digit {label}"


def report(cfg: DictConfig, scores: torch.Tensor, pretrain: DigitsDataset, query: DigitsDataset,
           model: DigitsClassifier) -> None:
    """Top-3 helpful / harmful pretraining examples per query, then the corrupted ones' ranking."""
    with torch.no_grad():
        predicted = model(query.x).argmax(1)
    print(f"\nscores S {tuple(scores.shape)}, {cfg.mode} mode. S[i, j] > 0: pretraining example i is harmful to "
          f"query j (< 0: helpful); removing i changes query j's loss by about -S[i, j] / {len(pretrain)}")
    for j in range(min(cfg.show_queries, scores.shape[1])):
        truth, guess = query.class_names[int(query.targets[j])], query.class_names[int(predicted[j])]
        print(f"\nquery {cfg.query} #{j}: digit {truth}, predicted {guess}")
        column = scores[:, j]
        for title, order in (("most helpful (score < 0: lowers its loss)", column.argsort()),
                             ("most harmful (score > 0: raises its loss)", column.argsort(descending=True))):
            print(f"  {title}")
            for i in order[:3].tolist():
                print(f"    pretrain {describe(pretrain, i):<40s} score {column[i].item():+.4e}")
    total = scores.sum(dim=1)
    k = min(cfg.top_k, len(total))
    corrupted = pretrain.corrupted_indices
    print(f"\nsummed over the {scores.shape[1]} queries (chance: {k * len(corrupted) / len(total):.1f} of {k}):")
    rankings = (("harmful (largest summed score)", total), ("helpful (most negative summed score)", -total),
                ("influential (largest summed |score|)", scores.abs().sum(dim=1)))
    for word, values in rankings:
        hits = int(torch.isin(values.topk(k).indices, corrupted).sum())
        print(f"  {hits} of the {len(corrupted)} corrupted pretraining examples rank among the {k} most {word}")


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    data = dict(cfg.data, seed=cfg.seed)
    pretrain_dm = DigitsDataModule(task="pretrain", **data)
    finetune_dm = DigitsDataModule(task="finetune", **{**data, "corrupt_fraction": 0.0})
    model = dict(cfg.model)
    snapshots = SnapshotDir(cfg.snapshot_dir)

    pretrain_model = DigitsClassifier(**model)
    pre = instantiate(cfg.callbacks.pretrain, _convert_="all")
    t_pre = fit(cfg, "pretrain", pretrain_model, pretrain_dm, pre)

    L.seed_everything(cfg.seed, workers=True)
    finetune_model = DigitsClassifier(**model, freeze_backbone=cfg.mode == "fixed",
                                      pretrained=str(snapshots.weights_path("pretrain")))
    ft = instantiate(cfg.callbacks.finetune, enforce_proximal=cfg.mode == "updated", _convert_="all")
    t_ft = fit(cfg, "finetune", finetune_model, finetune_dm, ft)

    report(cfg, ft.scores, pretrain_dm.train_dataset, finetune_dm.dataset(cfg.query), finetune_model)
    phases = ", ".join(f"{name} {sec:.1f} s" for name, sec in ft.info.get("seconds", {}).items())
    print(f"\ntimings: pretrain {t_pre:.1f} s, finetune + influence {t_ft:.1f} s (influence: {phases})")
    print(f"snapshots, scores and report in {snapshots.root}")


if __name__ == "__main__":
    main()
