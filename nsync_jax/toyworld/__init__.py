"""The procedural toy world (shapes, colours, backgrounds, styles) and the judge that reads its images back."""
