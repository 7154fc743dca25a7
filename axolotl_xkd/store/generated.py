"""Teacher generations among several teachers (`sequences: teacher` with `xkd.teachers`): which model samples each
store's rows, and which stores' rows training reads.

`mixture: route`: each store holds only the rows routed to its teacher, sampled by `xkd.generator`'s model or, unset,
by its own; training reads their union, each row routed to the store it came from. `weighted` / `confidence`: the
generator samples every row once, in the run of the first store written (the generator's own store, else the first
store of the list); every other store scores those rows, and training reads them from that store (live teachers
score them in process). Imports the store's reader and writer settings; Axolotl and datasets inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from axolotl_xkd.args import ModelTeacher, XKDConfig
from axolotl_xkd.keys import ROUTE
from axolotl_xkd.store.format import MANIFEST, Manifest, missing_shards
from axolotl_xkd.store.write import RoutedRows


@dataclass(frozen=True)
class StorePlan:
    """How one named store of a `sequences: teacher` config is written."""

    name: str
    generator: ModelTeacher | None  # the model that samples when it is not the store's own (xkd.generator)
    routed: RoutedRows | None
    rows_from: str | None  # the store whose generated rows this one scores
    generated_by: dict  # recorded in the manifest's generation and checked by training

    def settings(self) -> dict:
        """The PrecomputeSettings fields of this plan."""
        return {"generator": self.generator, "routed": self.routed, "rows_from": self.rows_from,
                "generated_by": self.generated_by}


def rows_store(config: XKDConfig):
    """Under weighted / confidence: the store that holds the generated rows (the generator's, else the first)."""
    stores = [t for t in config.teachers if t.source == "precomputed"]
    return next((t for t in stores if t.name == config.generator), stores[0])


def generated_by(config: XKDConfig, name: str) -> dict:
    """What the store of teacher `name` records of its rows: the teacher that sampled them and whether it holds only
    the rows routed to its teacher."""
    return {"generator": config.generator or name, "routed": config.mixture == "route"}


def sampling_block(config: XKDConfig, name: str) -> ModelTeacher:
    """The model block of the teacher `name` that samples: a `source: model` item as it is, a store's model_path."""
    block = next(t for t in config.teachers if t.name == name)
    if block.source == "model":
        return ModelTeacher(**block.model_dump(exclude={"name", "weight"}) | {"dtype": None, "offload": False})
    return ModelTeacher(path=block.model_path)


def store_plans(config: XKDConfig, entries: dict | None = None) -> list[StorePlan]:
    """Every store of `config` in the order to write them (the rows' store first under weighted / confidence);
    `entries`: the teacher each dataset entry names (routing.entry_teachers of the raw YAML)."""
    names = tuple(t.name for t in config.teachers)
    stores = [t for t in config.teachers if t.source == "precomputed"]
    if config.mixture != "route":
        first = rows_store(config)
        stores = [first, *(t for t in stores if t is not first)]
    plans = []
    for block in stores:
        sampler = config.generator or block.name
        routed = None if config.mixture != "route" else RoutedRows(config.route_column, names, config.default_teacher,
                                                                   names.index(block.name), entries)
        carrier = routed is not None or block is stores[0]
        generator = sampling_block(config, sampler) if sampler != block.name and carrier else None
        plans.append(StorePlan(block.name, generator, routed, None if carrier else stores[0].path,
                               generated_by(config, block.name)))
    return plans


def stored_rows(folder: str, generation: dict) -> dict:
    """The rows (input_ids, labels) of each split of the finished store at `folder`, which another teacher's store
    scores; refused unless it was generated as `generation` says."""
    from axolotl_xkd.store.read import load_split

    where = Path(folder) / MANIFEST
    manifest = Manifest.read(folder) if where.is_file() else None
    if manifest is None or any(missing_shards(folder, manifest, split) for split in manifest.splits):
        raise FileNotFoundError(f"{folder} holds the generated rows this store scores, but it is not finished; "
                                "precompute it first (`axolotl xkd precompute CONFIG.yml` writes it first)")
    if manifest.generation != generation:
        raise ValueError(f"{where}: generation {manifest.generation} differs from this config's {generation}; "
                         "precompute that store again (delete it first) so that every store records the same rows")
    return {split: load_split(folder, manifest, split).select_columns(["input_ids", "labels"])
            for split in manifest.splits}


def check_generation(manifest: Manifest, folder: str, config: XKDConfig, name: str) -> None:
    """Refuse a store whose rows another generator sampled, or that was routed when the config is not (or not)."""
    wanted = generated_by(config, name)
    found = {key: (manifest.generation or {}).get(key) for key in wanted}
    if found != wanted:
        raise ValueError(f"{Path(folder) / MANIFEST}: its rows were generated with {found}, but this config's "
                         f"xkd.generator and xkd.mixture make {wanted}; precompute the stores again with this config")


def load_generated_meta(cfg, config: XKDConfig):
    """Axolotl's TrainDatasetMeta of the generated rows: the union of the routed stores' rows, each with its store's
    teacher per token (`keys.ROUTE`), or the rows of the store that holds them."""
    from axolotl.loaders import load_tokenizer
    from datasets import concatenate_datasets

    from axolotl_xkd.store.read import check_manifest, load_split, training_meta

    tokenizer = load_tokenizer(cfg)
    route = config.mixture == "route"
    chosen = [t for t in config.teachers if t.source == "precomputed"] if route else [rows_store(config)]
    wants_eval = bool(cfg.val_set_size) or bool(cfg.test_datasets)
    parts: dict[str, list] = {"train": [], "eval": []}
    for block in chosen:
        manifest = Manifest.read(block.path)
        check_manifest(manifest, block.path, tokenizer=tokenizer, sequence_len=cfg.sequence_len, top_k=block.top_k,
                       sequences="teacher")
        check_generation(manifest, block.path, config, block.name)
        for split in ("train", "eval") if wants_eval else ("train",):
            if split not in manifest.splits:
                raise ValueError(f"{Path(block.path) / MANIFEST}: splits {sorted(manifest.splits)} have no {split!r}, "
                                 "but the config asks for evaluation; precompute again with it")
            if not manifest.splits[split]:  # a teacher no row is routed to
                continue
            rows = load_split(block.path, manifest, split).select_columns(["input_ids", "labels"])
            if route:
                index = [t.name for t in config.teachers].index(block.name)
                rows = rows.add_column(ROUTE, [[index] * len(ids) for ids in rows["input_ids"]])
            parts[split].append(rows)
    train, evaluation = (with_inputs(concatenate_datasets(p)) if p else None for p in (parts["train"], parts["eval"]))
    return training_meta(cfg, train, evaluation)


def with_inputs(dataset):
    """`dataset` with the attention_mask and position_ids Axolotl's own prepared rows carry (the collators read
    them)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    dataset = dataset.add_column("attention_mask", [[1] * n for n in lengths])
    return dataset.add_column("position_ids", [list(range(n)) for n in lengths])
