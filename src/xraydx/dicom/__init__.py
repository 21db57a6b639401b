"""DICOM networking: a node that classifies chest X-rays a PACS sends it, a DICOMweb client that pulls
them, and the results back to the PACS as DICOM Structured Reports (docs/pacs.md).

Layer L5 (like serve/): it uses xraydx.predict's Predictor, io's DICOM reader and explain's Grad-CAM;
only cli/ imports it. The third-party libraries (pynetdicom, highdicom, dicomweb-client: the ``dicom``
extra) are imported where they are used, so ``xraydx --help`` needs none of them.

Modules: ``results`` (the PHI-free results log), ``pipeline`` (screen -> classify -> build results),
``sr`` (the SR and the Grad-CAM Secondary Capture), ``send`` (C-STORE SCU / STOW-RS, the pending
queue, resend), ``node`` (the C-ECHO/C-STORE SCP), ``pull`` (QIDO-RS / WADO-RS).
"""
