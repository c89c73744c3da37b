"""lensforge: from raw images to a robust, compressed, monitored vision deployment.

Importing the package is cheap and has no side effects; each stage lives in its
own subpackage (``data``, ``models``, ``train``, ``evaluate``, ``deploy``,
``report``) and the CLI in ``lensforge.cli``.
"""

__version__ = "0.1.0"
