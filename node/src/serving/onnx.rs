//! The graph output names of an ONNX model, read straight from its protobuf bytes
//! (tract names outputs by their node; clients use the graph's names).

/// The graph output names of an ONNX model (`ModelProto.graph.output[].name`), read with
/// a minimal protobuf walk. None if the bytes do not parse.
pub fn onnx_graph_outputs(model: &[u8]) -> Option<Vec<String>> {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// Length-delimited fields `want` of a message, as slices.
    fn fields(b: &[u8], want: u64) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i)?;
            match key & 7 {
                0 => {
                    varint(b, &mut i)?;
                }
                1 => i = i.checked_add(8)?,
                5 => i = i.checked_add(4)?,
                2 => {
                    let len = usize::try_from(varint(b, &mut i)?).ok()?;
                    let end = i.checked_add(len)?;
                    let slice = b.get(i..end)?;
                    if key >> 3 == want {
                        out.push(slice);
                    }
                    i = end;
                }
                _ => return None,
            }
        }
        Some(out)
    }
    let graph = *fields(model, 7)?.first()?;
    fields(graph, 12)?
        .into_iter()
        .map(|vi| {
            let name = *fields(vi, 1)?.first()?;
            String::from_utf8(name.to_vec()).ok()
        })
        .collect()
}
