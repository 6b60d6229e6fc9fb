"""The lesion table: the engine's CSV read with numeric columns, the columns' units and descriptions,
and the table node made from it."""

import csv

from .scene import placeLikeInput
from .slicerapi import slicer, vtk


def readCsvColumns(path):
    """A CSV table as [(column name, values)], values converted to int or float when every cell allows.

    The lesion table is read this way (rather than by Slicer's CSV reader) so that numeric columns are
    numeric in the table node and sort as numbers.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    columns = []
    for index, name in enumerate(header):
        cells = [row[index] if index < len(row) else "" for row in body]
        columns.append((name, _convertColumn(cells)))
    return columns


# The lesion table's column names end in their unit (engine convention); the table node shows it.
_UNIT_SUFFIXES = (("_ml", "mL"), ("_mm3", "mm3"), ("_mm2", "mm2"), ("_mm", "mm"))
COLUMN_DESCRIPTIONS = {
    "id": "lesion number (as in the segment names and the figure)",
    "axial_diameter_mm": "longest diameter in the measurement plane (RECIST 1.1 / RANO)",
    "perpendicular_diameter_mm": "extent across the axial diameter, in the same slice",
    "longest_diameter_mm": "longest 3D diameter",
    "mean_probability": "the network's mean lesion probability over the lesion (0..1)",
}


def columnUnit(name):
    """The unit a lesion-table column name ends in ("" when it has none)."""
    return next((unit for suffix, unit in _UNIT_SUFFIXES if name.endswith(suffix)), "")


def _convertColumn(cells):
    for convert in (int, float):
        try:
            return [convert(cell) for cell in cells]
        except ValueError:
            continue
    return cells


def _kindOfEmptyColumn(name):
    """The type of a lesion-table column with no rows (no lesion found): all are numbers, counts whole."""
    return int if name in ("id", "voxels") or name.startswith("bbox_index") else float


def loadLesionTable(path, volumeNode, name):
    tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = tableNode.GetTable()
    for columnName, values in readCsvColumns(path):
        kind = type(values[0]) if values else _kindOfEmptyColumn(columnName)
        array = {int: vtk.vtkIntArray, float: vtk.vtkDoubleArray}.get(kind, vtk.vtkStringArray)()
        array.SetName(columnName)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
        tableNode.SetColumnUnitLabel(columnName, columnUnit(columnName))
        if columnName in COLUMN_DESCRIPTIONS:
            tableNode.SetColumnDescription(columnName, COLUMN_DESCRIPTIONS[columnName])
    tableNode.Modified()
    placeLikeInput(tableNode, volumeNode)
    return tableNode
