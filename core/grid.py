"""Voxel grids in physical space.

Arrays follow numpy/SimpleITK order (z, y, x); continuous indices handed to the
kernels follow ITK order (x, y, z). A grid maps a continuous ITK index i to the
physical point  p = D @ (s * i) + o  in LPS millimetres (D: direction cosines,
s: spacing in mm, o: origin = centre of voxel 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D voxel grid.

    Attributes:
        shape: array shape in numpy order (z, y, x).
        origin: physical point of voxel (0, 0, 0), LPS mm, (x, y, z).
        spacing: voxel size in mm along the grid axes (x, y, z).
        direction: 3x3 direction cosines; column k is grid axis k in LPS.
    """

    shape: tuple[int, int, int]
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    @classmethod
    def from_image(cls, image: sitk.Image) -> Grid:
        size = image.GetSize()
        return cls(
            shape=(int(size[2]), int(size[1]), int(size[0])),
            origin=np.asarray(image.GetOrigin(), dtype=np.float64),
            spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
            direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 homogeneous matrix from continuous index (x, y, z, 1) to LPS mm."""
        h = np.eye(4)
        h[:3, :3] = self.direction * self.spacing[None, :]
        h[:3, 3] = self.origin
        return h

    @property
    def physical_to_index(self) -> np.ndarray:
        """4x4 homogeneous matrix from LPS mm to continuous index (x, y, z, 1)."""
        return np.linalg.inv(self.index_to_physical)

    @property
    def center(self) -> np.ndarray:
        """Physical centre of the grid (LPS mm): the midpoint of the first and last voxel."""
        mid = (np.asarray(self.size_xyz, dtype=np.float64) - 1.0) / 2.0
        return self.to_physical(mid[None, :])[0]

    @property
    def extent_mm(self) -> np.ndarray:
        """Edge lengths of the field of view in mm along the grid axes (x, y, z)."""
        return np.asarray(self.size_xyz, dtype=np.float64) * self.spacing

    def to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Continuous indices (N, 3) in (x, y, z) order to LPS mm points (N, 3)."""
        h = self.index_to_physical
        return np.asarray(index_xyz, dtype=np.float64) @ h[:3, :3].T + h[:3, 3]

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS mm points (N, 3) to continuous indices (N, 3) in (x, y, z) order."""
        h = self.physical_to_index
        return np.asarray(points, dtype=np.float64) @ h[:3, :3].T + h[:3, 3]

    def strided(self, stride: int, offset: float = 0.0) -> Grid:
        """The grid whose voxel i is centred on voxel stride*i + offset of this grid.

        This is the geometry of a strided convolution output (offset 0: output
        voxel i sits on input voxel stride*i); the shape is ceil(n / stride).
        """
        shape = tuple(int(-(-n // stride)) for n in self.shape)
        origin = self.to_physical(np.full((1, 3), offset))[0]
        return Grid(shape=shape, origin=origin, spacing=self.spacing * stride,
                    direction=self.direction.copy())

    def image_like(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """Wrap an array (z, y, x[, c]) as a SimpleITK image with this geometry."""
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    def reference_image(self) -> sitk.Image:
        """An empty float32 image with this geometry (a resampling reference)."""
        image = sitk.Image(list(self.size_xyz), sitk.sitkFloat32)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image
