"""Model cards: the bundled models' cards, the default model for an input, and the texts that describe
a model (the model combo box tooltip, the module help)."""

import json
import logging
import re
from pathlib import Path

from SASSRSegmentLib.model.bundle import bundled_models, robustness_dice, validation_dice

from .paths import MODELS_DIR
from .slicerapi import _

# DICOM modality -> words a model card's "modality" uses for it.
MODALITY_WORDS = {"MR": ("mr", "mri", "magnetic"), "US": ("ultrasound", "us"), "CT": ("ct", "computed")}


def readModelCards(modelsDir=MODELS_DIR):
    """The model cards (`<modelsDir>/<name>/model.json`), sorted by name.

    A card's "name" is its folder's name: that is what `--model` resolves for bundled models.
    Unreadable cards are skipped with a warning so one broken bundle does not hide the others.
    """
    cards = []
    for name, folder in bundled_models(Path(modelsDir)).items():
        path = folder / "model.json"
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logging.warning("SASSRSegment: skipping unreadable model card %s: %s", path, exc)
            continue
        if not isinstance(card, dict):
            logging.warning("SASSRSegment: skipping model card %s: not a JSON object", path)
            continue
        card["name"] = name
        card["folder"] = str(folder)
        cards.append(card)
    return cards


def cardSpatialDims(card):
    """2 or 3: the dimensionality of the images a model takes (0 when its card does not say)."""
    return int((card.get("preprocessing") or {}).get("spatial_dims") or 0)


def hasImageSrDecoder(card):
    """Whether the model's network has the image-SR decoder that the super-resolved image needs.

    The card's "network" block is the network configuration the weights were saved with; a card without
    "image_sr" predates the option, and the network's default (the full network, with the decoder) applies.
    """
    return bool((card.get("network") or {}).get("image_sr", True))


def cardMatchesModality(card, modality):
    """Whether a card's free-text modality names the DICOM modality (MR, US, CT)."""
    words = re.findall(r"[a-z]+", str(card.get("modality") or "").lower())
    return any(word in words for word in MODALITY_WORDS.get(str(modality or "").upper(), ()))


def defaultModelName(cards, spatialDims, modality=None):
    """The model for an input: the first card (by name, as the engine picks) of the input's dimensionality,
    of the input's DICOM modality when that is known (OT, "other", says nothing); None when no card fits.
    A CT or a PET is not given the brain MRI model unasked: a model of another modality makes wrong masks."""
    fitting = [card for card in cards if cardSpatialDims(card) == spatialDims]
    if str(modality or "").upper() not in ("", "OT"):
        fitting = [card for card in fitting if cardMatchesModality(card, modality)]
    return fitting[0]["name"] if fitting else None


def expectedInputText(card):
    """One line saying what image a model expects, from its card's preprocessing block."""
    prep = card.get("preprocessing") or {}
    scale = prep.get("scale", "?")
    channels = ", ".join(prep.get("channels") or []) or _("one channel")
    if prep.get("spatial_dims") == 2:
        side = prep.get("lr_longer_side")
        size = _("longer side resampled to {pixels} pixels").format(pixels=side) if side else ""
        return _("2D image ({channels}); {size}; mask at x{scale} finer resolution").format(
            channels=channels, size=size, scale=scale
        )
    spacing = prep.get("lr_spacing")
    spacingText = " x ".join(f"{float(s):g}" for s in spacing) + " mm" if spacing else "?"
    return _("3D volume ({channels}) resampled to {spacing}; mask at x{scale} finer resolution").format(
        channels=channels, spacing=spacingText, scale=scale
    )


def modelSummary(card):
    """The model combo box tooltip: modality, expected input, scale and validation Dice from the card."""
    dice = validation_dice(card)
    diceText = f"{float(dice):.3f}" if isinstance(dice, (int, float)) else _("not recorded")
    lines = [
        card["name"] + (f": {card['description']}" if card.get("description") else ""),
        _("Modality: {modality}").format(modality=card.get("modality") or _("not stated")),
        _("Expected input: {text}").format(text=expectedInputText(card)),
        _("Scale: x{scale}").format(scale=(card.get("preprocessing") or {}).get("scale", "?")),
        _("Validation Dice (HR, mean): {dice}").format(dice=diceText),
    ]
    # The card's robustness table: the same validation cases, their low-resolution input made other ways.
    means = list(robustness_dice(card).values())
    if len(means) > 1:
        lines.append(
            _("On inputs made {count} ways: {low:.3f}-{high:.3f}").format(
                count=len(means), low=min(means), high=max(means)
            )
        )
    return "\n".join(lines)


def modelsHelpHtml(cards):
    """The part of the module help that says what each bundled model expects."""
    if not cards:
        return "<p>" + _("No bundled model was found in Resources/Models.") + "</p>"
    items = "".join(
        f"<li><b>{card['name']}</b> ({card.get('modality') or '?'}): {expectedInputText(card)}</li>"
        for card in cards
    )
    return f"<ul>{items}</ul>"
