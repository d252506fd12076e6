"""The Slicer bridge: ``mrml`` (nodes <-> arrays with their geometry), ``logic`` (the registration
logic on MRML nodes) and ``tasks`` (Qt-free background-task plumbing of the panel). vtk and MRML,
never Qt."""
