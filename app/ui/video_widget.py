"""The video surface: paints the latest QImage, aspect-fit, plus an optional message
("Loading model...", "Signal lost - retrying..."). Paints QImages directly: no QPixmap.

It tells the pipeline its size in device pixels (`viewSizeChanged`), so frames arrive already
at display size and are painted 1:1: no full-HD image is copied or scaled in the GUI thread."""

from __future__ import annotations

from PyQt6.QtCore import QRectF, Qt, pyqtSignal
from PyQt6.QtGui import QColor, QFont, QImage, QPainter
from PyQt6.QtWidgets import QSizePolicy, QWidget


class VideoWidget(QWidget):
    viewSizeChanged = pyqtSignal(int, int)  # (W, H) in device pixels

    def __init__(self, parent=None):
        super().__init__(parent)
        self._image: QImage | None = None
        self._message = ""
        self.setMinimumSize(320, 240)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)

    def set_image(self, image: QImage | None) -> None:
        self._image = image
        self.update()

    def image(self) -> QImage | None:
        return self._image

    def set_message(self, text: str) -> None:
        if text != self._message:
            self._message = text
            self.update()

    def message(self) -> str:
        return self._message

    def view_size(self) -> tuple[int, int]:
        """(W, H) of the video area in device pixels: the most a frame needs to be."""
        dpr = self.devicePixelRatioF()
        return max(1, round(self.width() * dpr)), max(1, round(self.height() * dpr))

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.viewSizeChanged.emit(*self.view_size())

    def image_rect(self) -> QRectF:
        """Where the frame is drawn (aspect-fit, centred). A frame already made for this size
        (within a pixel, as the pipeline makes them) is drawn 1:1 at whole pixels: a plain copy."""
        if self._image is None or self._image.isNull():
            return QRectF()
        dpr = self.devicePixelRatioF()
        iw, ih = self._image.width() / dpr, self._image.height() / dpr
        scale = min(self.width() / iw, self.height() / ih)
        if abs(iw * scale - iw) <= 1.0 and abs(ih * scale - ih) <= 1.0:
            return QRectF((self.width() - iw) // 2, (self.height() - ih) // 2, iw, ih)
        w, h = iw * scale, ih * scale
        return QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(0, 0, 0))
        if self._image is not None and not self._image.isNull():
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
            p.drawImage(self.image_rect(), self._image)
        if self._message:
            font = QFont(self.font())
            font.setPointSizeF(max(11.0, self.height() / 28))
            font.setBold(True)
            p.setFont(font)
            flags = Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap  # several lines fit too
            box = p.fontMetrics().boundingRect(self.rect().adjusted(20, 0, -20, 0), int(flags), self._message)
            box = box.adjusted(-14, -8, 14, 8)
            box.moveCenter(self.rect().center())
            p.fillRect(box, QColor(0, 0, 0, 170))
            p.setPen(QColor(255, 220, 80))
            p.drawText(box, int(flags), self._message)
        p.end()
