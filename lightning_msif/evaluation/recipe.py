"""What `evaluate` retrains: a two-stage training recipe, built from Python or from a Hydra config.

A recipe trains both stages on any subset of its pretraining set, deterministically for a seed, and
holds the data and the settings the scores need. Its models must sit at the optimum of the objectives
docs/math.md differentiates (pretraining ``(1/n) Σ_{i ∈ subset} ℓ_i`` over the *full* n, finetuning as
``mode`` says, both with an L2 penalty ``damping/2 ‖·‖²``): only then does the score predict the retrain.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union

from torch import nn

from ..core.objective import LossFn
from ..core.params import check_same_shared
from ..errors import MSIFError

Models = Tuple[nn.Module, nn.Module]
RECIPES = {"digits": "lightning_msif.demo.digits_recipe.DigitsRecipe"}
"""Short names ``build_recipe`` (and ``msif evaluate recipe=...``) accept for built-in recipes."""


class TwoStageRecipe(Protocol):
    """``recipe(pretrain_indices, seed, init=None) -> (pretrain_model, finetune_model)`` plus its data.

    ``init``: the full-data models of the same seed to start from (warm start); None: from the seed's
    initialisation. Datasets are map-style; ``pretrain_indices`` index ``pretrain_data``; the measured
    outcome is the finetune loss of each ``query_data`` example. ``identity()`` names everything that
    changes the trained models (it keys the retraining cache: change it when the training code changes).
    Optional attributes: ``pretrain_loss`` / ``finetune_loss`` ``(model, batch) -> Tensor[B]`` (default:
    the module's ``per_example_loss``, else cross-entropy).
    """

    pretrain_data: Any
    finetune_data: Any
    query_data: Any
    shared: str  # name prefix of θ in both models
    mode: str  # fixed | updated: how the recipe finetunes
    alpha: Optional[float]  # its proximal strength (updated mode)
    damping: float  # its L2 penalty λ (the influence damping that makes the scores exact)

    def identity(self) -> Dict[str, Any]: ...

    def __call__(self, pretrain_indices: Sequence[int], seed: int, init: Optional[Models] = None) -> Models: ...


@dataclass
class FunctionRecipe:
    """A recipe from a plain function ``train(pretrain_indices, seed[, init]) -> (pretrain_model, finetune_model)``.

    Its identity (the retraining cache key) is ``name`` (default: the function's qualified name), the
    settings and ``config``: put a version or the training settings in ``config``, or change ``name``,
    when the function changes, else earlier outcomes are reused from the cache.
    """

    train: Callable[..., Models]
    pretrain_data: Any
    finetune_data: Any
    query_data: Any
    shared: str = "backbone"
    mode: str = "fixed"
    alpha: Optional[float] = None
    damping: float = 0.0
    pretrain_loss: Optional[LossFn] = None
    finetune_loss: Optional[LossFn] = None
    name: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)

    def identity(self) -> Dict[str, Any]:
        fn = self.train
        name = self.name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        return {"train": name, "shared": self.shared, "mode": self.mode, "alpha": self.alpha, "damping": self.damping,
                **self.config}

    def __call__(self, pretrain_indices: Sequence[int], seed: int, init: Optional[Models] = None) -> Models:
        if init is None:
            return self.train(pretrain_indices, seed)
        if "init" not in inspect.signature(self.train).parameters:
            raise MSIFError(
                f"warm_start=True needs the training function to take init=(pretrain_model, finetune_model), "
                f"but {self.identity()['train']} has no 'init' parameter. Add one, or set warm_start=False."
            )
        return self.train(pretrain_indices, seed, init=init)


def build_recipe(spec: Union[TwoStageRecipe, str, Mapping[str, Any]], **options: Any) -> TwoStageRecipe:
    """A checked recipe from a recipe object, a short name (``"digits"``), a dotted class/factory path,
    or a Hydra config with ``_target_``; ``options`` are passed to the class or factory."""
    if isinstance(spec, (str, Mapping)):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        target = {"_target_": RECIPES.get(spec, spec)} if isinstance(spec, str) else spec
        try:
            spec = instantiate(target, **options, _convert_="all")
        except InstantiationException as err:
            cause = err.__cause__ or err
            if isinstance(cause, MSIFError):
                raise cause from None
            why = " ".join(str(cause).split())
            raise MSIFError(
                f"Cannot build the recipe {dict(target).get('_target_')!r} ({why}). Give a built-in name "
                f"({sorted(RECIPES)}), or the importable path of a recipe class or factory, with its options."
            ) from err
    elif options:
        raise MSIFError(f"Recipe options {sorted(options)} are only for a recipe built from a name or config.")
    check_recipe(spec)
    return spec  # type: ignore[return-value]


def check_recipe(recipe: Any) -> None:
    """The recipe has every attribute of ``TwoStageRecipe``, with usable values."""
    missing = [a for a in ("pretrain_data", "finetune_data", "query_data", "shared", "mode", "alpha", "damping",
                           "identity") if not hasattr(recipe, a)]
    if missing or not callable(recipe):
        raise MSIFError(
            f"{type(recipe).__name__} is not a two-stage recipe: it lacks {missing or ['__call__']}. A recipe is "
            "callable as recipe(pretrain_indices, seed, init=None) -> (pretrain_model, finetune_model) and has "
            "pretrain_data, finetune_data, query_data, shared, mode, alpha, damping and identity(); wrap a plain "
            "function in lightning_msif.evaluation.FunctionRecipe."
        )
    if recipe.mode not in ("fixed", "updated"):
        raise MSIFError(f"The recipe's mode is {recipe.mode!r}; it must be 'fixed' or 'updated'.")
    for name in ("pretrain_data", "finetune_data", "query_data"):
        data = getattr(recipe, name)
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or len(data) == 0:
            raise MSIFError(f"The recipe's {name} must be a non-empty map-style dataset (indexable, with a length), "
                            f"got {type(data).__name__}.")


def check_models(out: Any, recipe: TwoStageRecipe) -> Models:
    """What a recipe call returned, checked: two modules sharing ``recipe.shared``."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(m, nn.Module) for m in out)):
        got = f"a {type(out).__name__}"
        if isinstance(out, (tuple, list)):
            got += f" of {[type(m).__name__ for m in out]}"
        raise MSIFError(
            f"The recipe returned {got}; it must return (pretrain_model, finetune_model), two nn.Modules."
        )
    check_same_shared(out[0], out[1], recipe.shared)
    return out[0], out[1]
