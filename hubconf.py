"""torch.hub entrypoints: ``torch.hub.load("path/to/restv2", "restv2_tiny", source="local")``.

One entrypoint per model, each the package's own factory (``torch.hub.help`` shows its
docstring): keyword arguments go to the model (``num_classes``, ``backend``, ...), and
``checkpoint_path=`` loads a released checkpoint strictly. The weights are not downloaded: the
authors publish them on Baidu Pan and Google Drive, which no program can fetch.
"""

dependencies = ["torch", "einops"]

from restv2 import (  # noqa: E402, F401
    rest_base,
    rest_large,
    rest_lite,
    rest_small,
    restv2_base,
    restv2_large,
    restv2_small,
    restv2_tiny,
)
