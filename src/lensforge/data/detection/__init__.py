"""Object-detection data: COCO, YOLO, Pascal VOC, Label Studio and box-CSV sources.

``open_source(path)`` finds the format (:func:`detect_format`, rules in
:mod:`~lensforge.data.detection.layout`) and returns a ``task="detection"`` Source whose
targets are :class:`lensforge.tasks.detection.BoxTarget` s in the pixels of the decoded
image (EXIF orientation applied), clipped to it. Bad labels (degenerate or NaN boxes,
unknown classes, missing images, duplicate ids, unparsable files) raise one-line
DataErrors naming the file and the line or id, or with ``on_bad_label="skip"`` are left
out and listed in ``Source.problems``.

The parsers are our own, not globox's (MIT, checked at 2.9 in this venv), because
globox's readers do not fit where it matters here: ``AnnotationSet.from_coco`` raises a
bare KeyError on a missing key and keeps the last of two images with one id ("TODO: Error
handling" in its source); ``from_pascal_voc`` reports "Syntax error in imagenet annotation
file." without naming the file; ``from_yolo_*`` take one image extension per folder,
read image sizes without EXIF orientation and name no line; negatives, split layouts and
Label Studio's ``/data/local-files/?d=`` paths are not handled at all. Each parser is
short (JSON, XML, text and CSV from the standard library); the tests read our converted
files back with globox as an independent check.
"""

from __future__ import annotations

from lensforge.data.detection.common import ON_BAD_LABEL, LabelIssues, check_policy
from lensforge.data.detection.layout import FORMATS, detect_format, open_detection

__all__ = ["FORMATS", "ON_BAD_LABEL", "LabelIssues", "check_policy", "detect_format", "open_detection"]
