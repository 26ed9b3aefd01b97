"""Training from the Slicer logic: scene nodes or files → training cases → the trainer,
and the best checkpoint installed for the effects."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import weights as _weights
from ..jobs import Progress, ProgressCallback
from . import bridge
from .errors import LesionSegError


class TrainingLogic:
    """``LesionSegLogic``'s training methods (mixed in; uses its ``log``)."""

    def trainingCases(self, pairs, model: str, preset: Optional[str] = None) -> List[Any]:
        """Training data for :func:`LesionSegLib.training.train` from (volume, segmentation)
        pairs: MRML node pairs become in-memory cases (image and label with the volume's
        geometry; label values from the card's classes, matched to segments by name);
        file pairs are passed as paths (a ``.seg.nrrd`` label file is converted through
        MRML). Main thread (reads MRML)."""
        from .. import models
        p = models.preset(model, preset)
        classes = p["classes"]
        multi = models.Outputs.of(p).multi_label
        cases = []
        temp_scene = None
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise LesionSegError(f"training pair {k} must be (volume, segmentation), got {len(pair)} items")
            vol, seg = pair
            if isinstance(vol, (str, os.PathLike)) and isinstance(seg, (str, os.PathLike)):
                if not Path(vol).is_file():
                    raise LesionSegError(f"training pair {k}: no such image file {vol}")
                if not Path(seg).is_file():
                    raise LesionSegError(f"training pair {k}: no such label file {seg}")
                if str(seg).lower().endswith(".seg.nrrd"):
                    temp_scene = temp_scene or bridge.new_scene()
                    vnode = bridge.load_volume(temp_scene, vol)
                    snode = bridge.load_segmentation(temp_scene, seg)
                    cases.append(self._case_from_nodes(vnode, snode, classes, model, multi))
                    temp_scene.Clear(0)
                else:
                    cases.append((str(vol), str(seg)))
            elif hasattr(vol, "GetImageData") and hasattr(seg, "GetSegmentation"):
                cases.append(self._case_from_nodes(vol, seg, classes, model, multi))
            else:
                raise LesionSegError(f"training pair {k}: expected (volume node, segmentation node) or "
                                     f"(image path, label path), got ({type(vol).__name__}, {type(seg).__name__})")
        return cases

    @staticmethod
    def _case_from_nodes(volume, segmentation, classes, model, multi):
        """An in-memory training case as the trainer takes it: SimpleITK image and label
        with the volume's full geometry, so that the trainer orients it exactly as it
        orients files (axial slices, LPS) and as the predictor will."""
        import SimpleITK as sitk
        image = bridge.volume_to_sitk(volume)
        labels = bridge.labels_from_segmentation(segmentation, volume, classes, model=model, multi_label=False)
        label = sitk.GetImageFromArray(labels)
        label.CopyInformation(image)
        return {"image": image, "label": label, "case": volume.GetName() or "case"}

    def train(self, pairs, outputDir, model: str = "msenet", preset: Optional[str] = None,
              epochs: Optional[int] = None, device: str = "auto", recipeOverrides: Optional[Dict[str, Any]] = None,
              resume: bool = False, seed: int = 0, pretrained=None, install: bool = True,
              progress: Optional[ProgressCallback] = None, cancel=None):
        """Train ``model`` on (volume, segmentation) pairs — scene nodes or files — into
        ``outputDir`` with the trainer (:func:`LesionSegLib.training.train`). The best
        checkpoint is installed into the weights cache (``install``), so the effects
        can use it at once. Returns the trainer's ``TrainResult``.
        (The module panel calls :meth:`trainingCases` on the main thread and
        :meth:`trainCases` on a worker.)"""
        if not pairs:
            raise LesionSegError("no training pairs: select at least one volume with its segmentation")
        Progress(progress)(0.0, "preparing training data")
        cases = self.trainingCases(pairs, model, preset)
        return self.trainCases(cases, outputDir, model=model, preset=preset, epochs=epochs, device=device,
                               recipeOverrides=recipeOverrides, resume=resume, seed=seed, pretrained=pretrained,
                               install=install, progress=progress, cancel=cancel)

    def trainCases(self, cases, outputDir, model: str = "msenet", preset: Optional[str] = None,
                   epochs: Optional[int] = None, device: str = "auto",
                   recipeOverrides: Optional[Dict[str, Any]] = None, resume: bool = False, seed: int = 0,
                   pretrained=None, install: bool = True, progress: Optional[ProgressCallback] = None, cancel=None):
        """Train on cases made by :meth:`trainingCases` (touches no MRML node: any thread)."""
        from ..training import train as run_training
        if not cases:
            raise LesionSegError("no training cases")
        overrides = dict(recipeOverrides or {})
        if epochs is not None:
            overrides["epochs"] = int(epochs)
        prog = Progress(progress)
        report = prog.span(0.02, 0.98)

        def on_step(epoch, step, steps_per_epoch, metrics):
            # the trainer reports (epoch, step, steps per epoch, metrics); the GUI wants a fraction
            total = max(int(metrics.get("epochs", 1) or 1), 1)
            frac = (epoch + min(step, steps_per_epoch) / max(steps_per_epoch, 1)) / total
            loss = metrics.get("loss")
            report(frac, f"epoch {epoch + 1}/{total}" + (f", loss {loss:.4f}" if isinstance(loss, float) else ""))

        result = run_training(model, cases, str(outputDir), preset=preset, recipe_overrides=overrides or None,
                              resume=resume, device=device, seed=seed, progress=on_step,
                              cancel=cancel, pretrained=pretrained)
        if install and getattr(result, "best_checkpoint", None):
            # a name that says what it is: every run's best file is called best.pt
            stamp = time.strftime("%Y%m%d-%H%M%S")
            entry = _weights.import_checkpoint(result.best_checkpoint, name=f"{model}-{preset or 'default'}-{stamp}.pt",
                                               model=model, preset=preset)
            self.log(f"LesionSeg: installed trained weights {entry.id}")
        prog.done("training finished")
        return result
