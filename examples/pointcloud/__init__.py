"""Rotated point-cloud classification with vector neurons: synthetic shapes
(:mod:`examples.pointcloud.data`), VN-PointNet / VN-DGCNN (:mod:`examples.pointcloud.models`) and the
standard-vs-relaxed comparison (``python -m examples.pointcloud.run``)."""
