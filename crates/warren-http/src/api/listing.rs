//! The query parameters every collection of RabbitMQ's management API
//! takes: `sort` and `sort_reverse`, `columns`, and pagination (`page`,
//! `page_size`, `name`, `use_regex`), which KEDA's RabbitMQ scaler and
//! the management UI use. Without `page` a collection is a bare JSON list;
//! with it, an object with the page's `items` and the counts around them.
//!
//! One middleware applies them to every `GET /api/...` that answers a JSON
//! list, so each collection's handler only lists, and a collection added
//! later takes them too.

use std::cmp::Ordering;

use axum::Json;
use axum::extract::{Query, Request};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};

/// The largest collection the middleware reshapes, as JSON.
pub const COLLECTION_BYTES_MAX: usize = 256 << 20;

/// Items on a page unless `page_size` says otherwise, and the most it may
/// say (RabbitMQ's limits).
pub const PAGE_SIZE_DEFAULT: usize = 100;
pub const PAGE_SIZE_MAX: usize = 500;
/// The longest `name` filter; a regular expression is compiled within
/// [`REGEX_SIZE_MAX`] bytes, so a hostile pattern cannot take the memory.
pub const NAME_FILTER_BYTES_MAX: usize = 1024;
const REGEX_SIZE_MAX: usize = 1 << 20;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    sort: Option<String>,
    sort_reverse: Option<String>,
    columns: Option<String>,
    page: Option<String>,
    page_size: Option<String>,
    name: Option<String>,
    use_regex: Option<String>,
    // `pagination`, which the management UI also sends, is ignored:
    // paging follows from `page` alone, as in RabbitMQ.
}

/// How the names of a paginated listing are filtered.
enum NameFilter {
    All,
    /// RabbitMQ matches the text anywhere in the name, ignoring case.
    Contains(String),
    Regex(regex::Regex),
}

impl NameFilter {
    fn keeps(&self, item: &Value) -> bool {
        let name = item.get("name").and_then(Value::as_str).unwrap_or("");
        match self {
            NameFilter::All => true,
            NameFilter::Contains(text) => name.to_lowercase().contains(text),
            NameFilter::Regex(regex) => regex.is_match(name),
        }
    }
}

fn bad(reason: impl Into<String>) -> ApiError {
    ApiError::BadRequest(reason.into())
}

fn truth(value: Option<&str>, what: &str) -> ApiResult<bool> {
    match value {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad(format!("{what} is true or false, not '{other}'"))),
    }
}

/// RabbitMQ's answer to pagination parameters that are not numbers, or a
/// name filter that is not a regular expression.
fn unparsable() -> ApiError {
    bad("Pagination parameters are invalid")
}

fn number(value: &str) -> ApiResult<i64> {
    value.trim().parse().map_err(|_| unparsable())
}

impl ListQuery {
    /// Whether the query asks for anything but the collection as it is.
    fn shapes(&self) -> bool {
        let given = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.is_empty());
        given(&self.sort) || given(&self.sort_reverse) || given(&self.columns) || given(&self.page)
    }

    fn name_filter(&self) -> ApiResult<NameFilter> {
        let Some(name) = self.name.as_deref().filter(|name| !name.is_empty()) else {
            return Ok(NameFilter::All);
        };
        if name.len() > NAME_FILTER_BYTES_MAX {
            return Err(bad(format!(
                "name is longer than {NAME_FILTER_BYTES_MAX} bytes"
            )));
        }
        if truth(self.use_regex.as_deref(), "use_regex")? {
            // Case-insensitive, as RabbitMQ matches.
            let regex = regex::RegexBuilder::new(name)
                .case_insensitive(true)
                .size_limit(REGEX_SIZE_MAX)
                .build()
                .map_err(|_| unparsable())?;
            Ok(NameFilter::Regex(regex))
        } else {
            Ok(NameFilter::Contains(name.to_lowercase()))
        }
    }
}

/// The field at a dotted path (`message_stats.publish_details.rate`).
fn field<'a>(item: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(item, |value, key| value.get(key))
        .filter(|value| !value.is_null())
}

/// How two values of one field order: missing first, then numbers by
/// value, then text, then anything else by its JSON.
fn compare(left: Option<&Value>, right: Option<&Value>) -> Ordering {
    fn rank(value: Option<&Value>) -> u8 {
        match value {
            None => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(_) => 4,
        }
    }
    match (left, right) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            a.partial_cmp(&b).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(a)), Some(Value::String(b))) => a.cmp(b),
        (Some(Value::Bool(a)), Some(Value::Bool(b))) => a.cmp(b),
        (Some(a), Some(b)) if rank(left) == 4 && rank(right) == 4 => {
            a.to_string().cmp(&b.to_string())
        }
        _ => rank(left).cmp(&rank(right)),
    }
}

/// Only the fields `columns` names, nested as in the item.
fn select_columns(item: &Value, columns: &[&str]) -> Value {
    let mut selected = Map::new();
    for column in columns {
        let Some(value) = field(item, column) else {
            continue;
        };
        let mut keys = column.split('.').peekable();
        let mut target = &mut selected;
        while let Some(key) = keys.next() {
            if keys.peek().is_none() {
                target.insert(key.to_owned(), value.clone());
                break;
            }
            let next = target
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            target = next.as_object_mut().expect("made an object above");
        }
    }
    Value::Object(selected)
}

/// Middleware: a `GET` that answers a JSON list, shaped as its query
/// asks. Anything else passes as it is.
pub async fn shape_collections(request: Request, next: Next) -> Response {
    let query = match Query::<ListQuery>::try_from_uri(request.uri()) {
        Ok(Query(query))
            if request.method() == Method::GET
                && request.uri().path().starts_with("/api/")
                && query.shapes() =>
        {
            query
        }
        _ => return next.run(request).await,
    };
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !response.status().is_success() || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, COLLECTION_BYTES_MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return ApiError::Internal(format!("the listing could not be read: {error}"))
                .into_response();
        }
    };
    let items = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(items)) => items,
        // One object, not a collection: as it was.
        _ => return Response::from_parts(parts, axum::body::Body::from(bytes)),
    };
    match shape(items, &query, pages(&path)) {
        Ok(shaped) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            (parts, Json(shaped)).into_response()
        }
        Err(error) => error.into_response(),
    }
}

/// The collections RabbitMQ pages; the others stay lists whatever the
/// query says.
const PAGED_COLLECTIONS: [&str; 5] = [
    "/api/queues",
    "/api/exchanges",
    "/api/connections",
    "/api/channels",
    "/api/vhosts",
];

fn pages(path: &str) -> bool {
    PAGED_COLLECTIONS.iter().any(|collection| {
        path.strip_prefix(collection).is_some_and(|rest| {
            // The collection, or its per-vhost form: one more segment.
            rest.is_empty() || (rest.starts_with('/') && !rest[1..].contains('/'))
        })
    }) && !path.starts_with("/api/vhosts/")
}

/// The items as the query asks: filtered, sorted, paged (where `pages`)
/// and cut to its columns.
pub fn shape(mut items: Vec<Value>, query: &ListQuery, pages: bool) -> ApiResult<Value> {
    let paginated = match query.page.as_deref() {
        None | Some("") => None,
        Some(_) if !pages => None,
        Some(page) => {
            let page = number(page)?;
            let page_size = match query.page_size.as_deref() {
                None | Some("") => PAGE_SIZE_DEFAULT as i64,
                Some(size) => number(size)?,
            };
            if page < 1 || !(1..=PAGE_SIZE_MAX as i64).contains(&page_size) {
                return Err(ApiError::BadRequestOf {
                    error: "invalid_pagination_parameters",
                    reason: format!(
                        "Invalid pagination parameters: page number {page}, page size {page_size}"
                    ),
                });
            }
            Some((page as usize, page_size as usize, query.name_filter()?))
        }
    };
    let total_count = items.len();
    if let Some((_, _, filter)) = &paginated {
        items.retain(|item| filter.keeps(item));
    }
    if let Some(sort) = query.sort.as_deref().filter(|sort| !sort.is_empty()) {
        items.sort_by(|a, b| compare(field(a, sort), field(b, sort)));
    }
    if truth(query.sort_reverse.as_deref(), "sort_reverse")? {
        items.reverse();
    }
    let columns: Vec<&str> = query
        .columns
        .as_deref()
        .map(|columns| {
            columns
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let select = |items: Vec<Value>| -> Vec<Value> {
        if columns.is_empty() {
            items
        } else {
            items
                .iter()
                .map(|item| select_columns(item, &columns))
                .collect()
        }
    };
    let Some((page, page_size, _)) = paginated else {
        return Ok(Value::Array(select(items)));
    };
    let filtered_count = items.len();
    let page_count = filtered_count.div_ceil(page_size);
    if page > page_count.max(1) {
        return Err(ApiError::BadRequestOf {
            error: "page_out_of_range",
            reason: format!(
                "Page out of range, page: {page} page size: {page_size}, len: {filtered_count}"
            ),
        });
    }
    let on_page: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .collect();
    Ok(json!({
        "filtered_count": filtered_count,
        "item_count": on_page.len(),
        "items": select(on_page),
        "page": page,
        "page_count": page_count,
        "page_size": page_size,
        "total_count": total_count,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues() -> Vec<Value> {
        ["orders", "Orders-dlq", "emails", "invoices", "orders.retry"]
            .iter()
            .enumerate()
            .map(|(index, name)| {
                json!({"name": name, "vhost": "/", "messages": 10 - index,
                       "message_stats": {"publish": index}})
            })
            .collect()
    }

    fn query(pairs: &[(&str, &str)]) -> ListQuery {
        let encoded: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        serde_urlencoded_query(&encoded.join("&"))
    }

    fn serde_urlencoded_query(text: &str) -> ListQuery {
        let uri: axum::http::Uri = format!("/x?{text}").parse().unwrap();
        axum::extract::Query::<ListQuery>::try_from_uri(&uri)
            .unwrap()
            .0
    }

    fn names(value: &Value) -> Vec<&str> {
        let list = value.get("items").unwrap_or(value);
        list.as_array()
            .unwrap()
            .iter()
            .map(|item| item["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn without_a_page_the_list_stays_a_list() {
        let shaped = shape(queues(), &ListQuery::default(), true).unwrap();
        assert_eq!(names(&shaped).len(), 5);
        // `name` filters only a paginated listing, as in RabbitMQ.
        let shaped = shape(queues(), &query(&[("name", "orders")]), true).unwrap();
        assert_eq!(names(&shaped).len(), 5);
    }

    #[test]
    fn sorts_by_a_nested_field_either_way() {
        let shaped = shape(queues(), &query(&[("sort", "messages")]), true).unwrap();
        assert_eq!(
            names(&shaped),
            ["orders.retry", "invoices", "emails", "Orders-dlq", "orders"]
        );
        let shaped = shape(
            queues(),
            &query(&[("sort", "message_stats.publish"), ("sort_reverse", "true")]),
            true,
        )
        .unwrap();
        assert_eq!(names(&shaped)[0], "orders.retry");
    }

    #[test]
    fn pages_count_what_the_name_filter_keeps() {
        let shaped = shape(
            queues(),
            &query(&[("page", "1"), ("page_size", "2"), ("name", "orders")]),
            true,
        )
        .unwrap();
        assert_eq!(names(&shaped), ["orders", "Orders-dlq"]);
        assert_eq!(shaped["filtered_count"], 3);
        assert_eq!(shaped["total_count"], 5);
        assert_eq!(shaped["page_count"], 2);
        assert_eq!(shaped["item_count"], 2);
        let second = shape(
            queues(),
            &query(&[("page", "2"), ("page_size", "2"), ("name", "orders")]),
            true,
        )
        .unwrap();
        assert_eq!(names(&second), ["orders.retry"]);

        let regex = shape(
            queues(),
            &query(&[("page", "1"), ("name", "^orders$"), ("use_regex", "true")]),
            true,
        )
        .unwrap();
        assert_eq!(names(&regex), ["orders"]);
        assert_eq!(regex["page_size"], PAGE_SIZE_DEFAULT);
    }

    #[test]
    fn the_regex_ignores_case_and_only_some_collections_page() {
        let regex = shape(
            queues(),
            &query(&[("page", "1"), ("name", "^orders-"), ("use_regex", "true")]),
            true,
        )
        .unwrap();
        assert_eq!(names(&regex), ["Orders-dlq"]);
        let unpaged = shape(queues(), &query(&[("page", "1")]), false).unwrap();
        assert!(unpaged.is_array());
        for (path, paged) in [
            ("/api/queues", true),
            ("/api/queues/%2F", true),
            ("/api/queues/%2F/q/bindings", false),
            ("/api/exchanges", true),
            ("/api/connections", true),
            ("/api/channels", true),
            ("/api/vhosts", true),
            ("/api/vhosts/%2F/connections", false),
            ("/api/users", false),
            ("/api/bindings", false),
        ] {
            assert_eq!(pages(path), paged, "{path}");
        }
    }

    #[test]
    fn columns_keep_only_the_named_fields() {
        let shaped = shape(
            queues(),
            &query(&[("columns", "name,message_stats.publish")]),
            true,
        )
        .unwrap();
        assert_eq!(
            shaped[1],
            json!({"name": "Orders-dlq", "message_stats": {"publish": 1}})
        );
    }

    #[test]
    fn bad_pages_are_refused() {
        for pairs in [
            vec![("page", "0")],
            vec![("page", "x")],
            vec![("page", "9")],
            vec![("page", "1"), ("page_size", "501")],
            vec![("page", "1"), ("name", "("), ("use_regex", "true")],
            vec![("sort_reverse", "maybe")],
        ] {
            assert!(shape(queues(), &query(&pairs), true).is_err(), "{pairs:?}");
        }
        let out_of_range = shape(queues(), &query(&[("page", "9")]), true).unwrap_err();
        assert!(matches!(
            out_of_range,
            ApiError::BadRequestOf {
                error: "page_out_of_range",
                ..
            }
        ));
        let invalid = shape(queues(), &query(&[("page", "0")]), true).unwrap_err();
        assert!(matches!(
            invalid,
            ApiError::BadRequestOf {
                error: "invalid_pagination_parameters",
                ..
            }
        ));
        // An empty collection still has its first page.
        let empty = shape(Vec::new(), &query(&[("page", "1")]), true).unwrap();
        assert_eq!(
            (empty["page_count"].clone(), empty["items"].clone()),
            (json!(0), json!([]))
        );
    }
}
