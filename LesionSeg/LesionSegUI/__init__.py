"""Parts of the LesionSeg module (``LesionSeg.py``): the Training and Weights sections of
the panel, and the self-test methods. A package, so that Slicer does not take these files
for modules of their own."""
