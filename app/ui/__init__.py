"""PyQt6 viewer. Only the GUI thread touches widgets; pipeline threads hand over copied
QImages through Qt signals (queued connections), never QPixmaps."""
