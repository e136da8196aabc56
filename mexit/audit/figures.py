"""Figure helpers shared by the report's sections: matplotlib figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import io
from typing import Any


def png_base64(fig: Any, *, dpi: int = 110) -> str:
    """``fig`` as a base64 PNG (for ``data:image/png;base64,…``); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
