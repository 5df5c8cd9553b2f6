//! Errors as one line of text for operators: an error and its sources,
//! without the levels that repeat each other (gRPC and transport errors
//! do). Used by the admin API's client and the listener's shippers.

/// Appends `error` and its sources to `text` as `: a: b`, skipping a level
/// whose text the previous one already contains (transport errors repeat
/// themselves down the chain) and tonic's bare "transport error" wrapper,
/// which says nothing its sources do not.
pub fn append_chain(text: &mut String, error: &(dyn std::error::Error + 'static)) {
    let mut next = Some(error);
    while let Some(error) = next {
        let level = error.to_string();
        if !level.is_empty() && level != "transport error" && !text.contains(&level) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&level);
        }
        next = error.source();
    }
}

/// An error and its sources as one line (`append_chain`).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    append_chain(&mut text, error);
    text
}
