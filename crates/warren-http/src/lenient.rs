//! Booleans and numbers in request bodies as RabbitMQ's management API
//! takes them: as JSON values, or as their text (`"true"`, `"5"`), which
//! is what rabbitmqadmin sends for every field given on its command line.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::Error;
use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum ValueOrText<T> {
    Value(T),
    Text(String),
}

fn parse<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
    T::Err: Display,
{
    match ValueOrText::<T>::deserialize(deserializer)? {
        ValueOrText::Value(value) => Ok(value),
        ValueOrText::Text(text) => text
            .trim()
            .parse()
            .map_err(|error| D::Error::custom(format!("'{text}': {error}"))),
    }
}

/// A boolean, or "true" / "false".
pub fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    parse(deserializer)
}

/// A number, or its decimal text.
pub fn number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
    T::Err: Display,
{
    parse(deserializer)
}

/// An optional number, or its decimal text; null is none.
pub fn optional_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
    T::Err: Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Maybe<T> {
        Value(T),
        Text(String),
        Null(()),
    }
    match Maybe::<T>::deserialize(deserializer)? {
        Maybe::Value(value) => Ok(Some(value)),
        Maybe::Null(()) => Ok(None),
        Maybe::Text(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|error| D::Error::custom(format!("'{text}': {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Form {
        #[serde(deserialize_with = "boolean")]
        durable: bool,
        #[serde(deserialize_with = "number")]
        count: usize,
        #[serde(default, deserialize_with = "optional_number")]
        truncate: Option<usize>,
    }

    fn form(body: &str) -> Result<Form, serde_json::Error> {
        serde_json::from_str(body)
    }

    #[test]
    fn values_and_their_text_are_the_same() {
        for body in [
            r#"{"durable": true, "count": 5, "truncate": 50}"#,
            r#"{"durable": "true", "count": "5", "truncate": "50"}"#,
        ] {
            let parsed = form(body).unwrap();
            assert!(parsed.durable);
            assert_eq!((parsed.count, parsed.truncate), (5, Some(50)));
        }
        let parsed = form(r#"{"durable": "false", "count": 1, "truncate": null}"#).unwrap();
        assert!(!parsed.durable && parsed.truncate.is_none());
        assert!(
            form(r#"{"durable": false, "count": 1}"#)
                .unwrap()
                .truncate
                .is_none()
        );
    }

    #[test]
    fn other_text_is_refused_with_what_it_was() {
        let error = form(r#"{"durable": "yes", "count": 1}"#).err().unwrap();
        assert!(error.to_string().contains("'yes'"), "{error}");
        assert!(form(r#"{"durable": true, "count": "-1"}"#).is_err());
        assert!(form(r#"{"durable": true, "count": 1.5}"#).is_err());
    }
}
