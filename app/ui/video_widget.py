"""The video surface: paints the latest QImage, aspect-fit, plus an optional message
("Loading model...", "Signal lost - retrying..."). Paints QImages directly: no QPixmap."""

from __future__ import annotations

from PyQt6.QtCore import QRectF, Qt
from PyQt6.QtGui import QColor, QFont, QImage, QPainter
from PyQt6.QtWidgets import QSizePolicy, QWidget


class VideoWidget(QWidget):
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

    def image_rect(self) -> QRectF:
        """Where the frame is drawn (aspect-fit, centred)."""
        if self._image is None or self._image.isNull():
            return QRectF()
        iw, ih = self._image.width(), self._image.height()
        scale = min(self.width() / iw, self.height() / ih)
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
