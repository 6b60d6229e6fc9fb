"""Grid geometry in plain Python (4x4 matrices as nested rows): a volume's dimensionality, boxes and
their corners, a grid's voxel-corner bounds, and the HR grid the engine writes its output on."""


def gridSpatialDims(dimensions):
    """2 for a one-slice volume (how Slicer holds a 2D image, and how the engine treats it), else 3."""
    return 2 if int(dimensions[2]) == 1 else 3


def hrScales(card, dimensions):
    """Per-axis refinement of the engine's HR output: the card's scale, except across a 2D image's slice."""
    scale = int(card["preprocessing"]["scale"])
    return [scale, scale, 1 if gridSpatialDims(dimensions) == 2 else scale]


def boxCorners(bounds):
    """The eight corners of an axis-aligned box given as (xmin, xmax, ymin, ymax, zmin, zmax)."""
    xs, ys, zs = bounds[0:2], bounds[2:4], bounds[4:6]
    return [(x, y, z) for x in xs for y in ys for z in zs]


def boundsOfPoints(points):
    """The axis-aligned bounds (xmin, xmax, ymin, ymax, zmin, zmax) of 3D points."""
    points = list(points)
    if not points:
        raise ValueError("boundsOfPoints needs at least one point")
    bounds = []
    for axis in range(3):
        values = [p[axis] for p in points]
        bounds += [min(values), max(values)]
    return bounds


def voxelCornerBounds(ijkToRas, dimensions):
    """Physical bounds of a grid: voxel corners at index -1/2 and n-1/2, mapped by a 4x4 IJK-to-RAS.

    `ijkToRas` is a 4x4 nested sequence (row-major). Two grids cover the same physical extent exactly
    when these bounds agree, whatever their spacing.
    """
    box = []
    for n in dimensions:
        box += [-0.5, n - 0.5]
    corners = []
    for i, j, k in boxCorners(box):
        corners.append([sum(ijkToRas[r][c] * v for c, v in enumerate((i, j, k, 1.0))) for r in range(3)])
    return boundsOfPoints(corners)


def superResolvedGrid(ijkToRas, dimensions, scales):
    """The input grid made `scales[k]` times finer along axis k over exactly the same physical extent.

    This is the grid of the engine's HR output (`hr_grid` in docs/DESIGN.md): fine voxel i sits at input
    continuous index (i + 1/2) / s - 1/2. Returns (4x4 IJK-to-RAS rows, dimensions).
    """
    fine = [[float(value) for value in row] for row in ijkToRas]
    for r in range(3):
        fine[r][3] += sum(fine[r][c] * (1.0 / scales[c] - 1.0) / 2.0 for c in range(3))
        for c in range(3):
            fine[r][c] /= scales[c]
    return fine, [int(dimensions[k]) * int(scales[k]) for k in range(3)]


def matrixRows(matrix):
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]
