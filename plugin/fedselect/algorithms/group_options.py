"""Options of the fixed layer-group partitions FedAlt and LG-FedAvg; imports neither torch nor FedML.

Both baselines split the model once, by layer group, into a personal part that never leaves the
client and a shared part that is averaged (:mod:`fedselect.algorithms.group_partition` trains
them). Their options dataclasses derive from :class:`GroupOptions` and carry a
:class:`PartitionSetting`: whether the named groups are personal or shared, and whether the local
schedule is LocalAlt or joint SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from fedselect.options import ConfigError

__all__ = ["FedAltOptions", "GroupOptions", "LGFedAvgOptions", "PartitionSetting"]


@dataclass(frozen=True)
class PartitionSetting:
    """How an algorithm reads its layer-group option and trains.

    ``groups_key``: the option (under ``algo:``) naming the layer groups.
    ``groups_personal``: True, the named groups are personal and the rest shared (FedAlt);
    False, the named groups are shared and the rest, BatchNorm statistics included, personal
    (LG-FedAvg).
    ``localalt``: True, LocalAlt with the option ``localalt_epoch``; False, joint SGD.
    """

    groups_key: str
    groups_personal: bool
    localalt: bool

    @property
    def key(self) -> str:
        return f"algo.{self.groups_key}"

    def check_names(self, groups: Sequence[str]) -> None:
        """At least one layer group, none twice (a ConfigError naming the key)."""
        if not groups:
            # FedAlt with nothing personal is FedAvg; LG-FedAvg with nothing shared is 'local'
            empty = "personal the run is 'fedavg'" if self.groups_personal else "shared the run is 'local'"
            raise ConfigError(f"config key '{self.key}' must name at least one layer group (with nothing {empty})")
        if len(set(groups)) != len(groups):
            raise ConfigError(f"config key '{self.key}' names a group twice: {list(groups)}")

    def check_coverage(self, named: set[str], state: set[str]) -> None:
        """The named groups' entries must leave the other part non-empty."""
        if not state - named:
            # FedAlt with nothing shared is 'local'; LG-FedAvg with nothing personal is FedAvg
            rest = "shared (that is 'local')" if self.groups_personal else "personal (that is FedAvg)"
            raise ConfigError(f"config key '{self.key}' covers the whole model: nothing is {rest}")


class GroupOptions:
    """Base of a group-partition algorithm's options dataclass: its ``partition`` setting, and
    the check of the layer groups it names (when the config is validated)."""

    partition: ClassVar[PartitionSetting]

    def __post_init__(self) -> None:
        self.partition.check_names(getattr(self, self.partition.groups_key))


@dataclass(frozen=True)
class FedAltOptions(GroupOptions):
    """The fixed personal part, by layer-group name.

    ``personal_groups``: ("head",), the output-layer split of Pillutla et al. 2022 (Sec. 5 studies
    input-layer, output-layer and adapter splits; the FedSelect paper, arXiv:2306.13264, runs
    FedAlt with the classifier head personal). Any other fixed set of the model's layer groups
    (:func:`fedselect.models.layer_groups`, e.g. ["stem"] for the input-layer split) may be named.
    Local epochs are ``train.local_epochs`` (5 in the FedSelect paper for every method);
    ``localalt_epoch`` says how one epoch is spent (:data:`fedselect.core.localalt.EPOCH_MODES`):
    "split" (default, equal local work) trains v on the first half of the epoch's shuffled
    samples and u on the second half; "two_passes" is a full pass over v, then over u.
    """

    # the named groups are personal; LocalAlt
    partition: ClassVar[PartitionSetting] = PartitionSetting("personal_groups", groups_personal=True, localalt=True)

    # the model's layer groups (fedselect.models.layer_groups: e.g. stem, block names, head) that are
    # personal; every other entry is shared and averaged
    personal_groups: tuple[str, ...] = ("head",)
    # one LocalAlt epoch: split (the personal part on half the epoch's shuffled samples, then the
    # shared part on the other half: one pass) or two_passes (a full pass over each, 2E passes)
    localalt_epoch: Literal["split", "two_passes"] = "split"


@dataclass(frozen=True)
class LGFedAvgOptions(GroupOptions):
    """Which layer groups are global (shared); everything else is the local representation.

    ``shared_groups``: ("head",), the split of the FedSelect paper's baseline (arXiv:2306.13264,
    Sec. 5: "personal representation, shared head"); LG-FedAvg's own experiments keep the top
    layers global (Liang et al. 2020, Sec. 4), which for the models here is the head group.
    Names are the model's layer-group names (:func:`fedselect.models.layer_groups`).
    """

    # the named groups are shared, the rest personal; joint SGD
    partition: ClassVar[PartitionSetting] = PartitionSetting("shared_groups", groups_personal=False, localalt=False)

    # the model's layer groups that are shared and averaged; everything else (the representation,
    # BatchNorm statistics included) is personal
    shared_groups: tuple[str, ...] = ("head",)
