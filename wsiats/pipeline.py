"""The names `wsiats.pipeline` held before it was split by concept, for code written against it.

New code imports from the modules that own them: `wsiats.view` (the view, its geometry, `Augment`),
`wsiats.reader` (`PatchReader`, `SlidePool`, `OpenedSlide`), `wsiats.forward` (the forward pass,
`attention_map`, `ATSForward`) and `wsiats.loss` (`loss_fn`, `class_weights`).
"""

from wsiats.forward import (  # noqa: F401
    SPREAD_PATCHES,
    ATSForward,
    ForwardResult,
    SlideBatchItem,
    attention_map,
    forward_batch,
    spread_cells,
    view_attention,
    zoom_cells,
)
from wsiats.loss import class_weights, loss_fn  # noqa: F401
from wsiats.reader import OpenedSlide, PatchReader, SlidePool  # noqa: F401
from wsiats.view import (  # noqa: F401
    Augment,
    PreparedView,
    cell_centers,
    load_view,
    patch_boxes,
    patch_downsample,
    prepare_view,
    view_downsample,
    with_exploration,
)
