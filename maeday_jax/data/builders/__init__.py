"""tfds builders of the project's datasets (array_record, no TensorFlow needed)."""

from maeday_jax.data.builders.base import ImageBuilder
from maeday_jax.data.builders.btad import Btad
from maeday_jax.data.builders.folder import Folder
from maeday_jax.data.builders.kolektorsdd2 import KolektorSdd2
from maeday_jax.data.builders.magnetic_tile import MagneticTile
from maeday_jax.data.builders.mvtec_ad import MvtecAd
from maeday_jax.data.builders.visa import Visa

__all__ = ["Btad", "Folder", "ImageBuilder", "KolektorSdd2", "MagneticTile", "MvtecAd", "Visa"]
