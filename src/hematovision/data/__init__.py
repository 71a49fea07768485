"""Images in: the upstream dataset under DVC, validation, cells found by content, the split, and the
white-cell crop that training and serving share."""
