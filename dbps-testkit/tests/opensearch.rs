//! The shared OpenSearch server through its REST API: analyzers, search, external versions,
//! aliases, and the isolation and cleanup of each test's indices.

use dbps_testkit::TestOpenSearch;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One request against the server; the status and the JSON reply.
async fn call(
    search: &TestOpenSearch,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let mut request = search.client().request(method, format!("{}/{path}", search.url()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let reply = response.json::<Value>().await?;
    Ok((status, reply))
}

/// Calls and insists on a success status.
async fn ok(
    search: &TestOpenSearch,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Box<dyn std::error::Error>> {
    let (status, reply) = call(search, method.clone(), path, body).await?;
    if !status.is_success() {
        return Err(format!("{method} {path}: {status} {reply}").into());
    }
    Ok(reply)
}

/// An index whose `title` and `body` use the english analyzer.
async fn create_articles(search: &TestOpenSearch, index: &str) -> TestResult {
    ok(
        search,
        Method::PUT,
        index,
        Some(json!({
            "mappings": {
                "properties": {
                    "title": {"type": "text", "analyzer": "english"},
                    "body": {"type": "text", "analyzer": "english"},
                    "status": {"type": "keyword"}
                }
            }
        })),
    )
    .await?;
    Ok(())
}

/// The ids of the hits of a `match` query on `field`.
async fn search_ids(
    search: &TestOpenSearch,
    index: &str,
    field: &str,
    text: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let reply = ok(
        search,
        Method::POST,
        &format!("{index}/_search"),
        Some(json!({"query": {"match": {field: text}}, "sort": ["_score", {"_id": "asc"}]})),
    )
    .await?;
    let mut ids: Vec<String> = reply["hits"]["hits"]
        .as_array()
        .ok_or("no hits in the reply")?
        .iter()
        .filter_map(|hit| hit["_id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

#[tokio::test]
async fn english_full_text_search_finds_documents_by_their_stems() -> TestResult {
    let search = dbps_testkit::opensearch().await?;
    let articles = search.index("Articles");
    assert_eq!(
        articles,
        format!("{}-articles", search.prefix()),
        "names are lowercased"
    );
    create_articles(&search, &articles).await?;

    // The analyzer is the english one: "running" and "runs" share the stem "run".
    let analyzed = ok(
        &search,
        Method::POST,
        &format!("{articles}/_analyze"),
        Some(json!({"field": "body", "text": "Running shoes"})),
    )
    .await?;
    let tokens: Vec<&str> = analyzed["tokens"]
        .as_array()
        .ok_or("no tokens")?
        .iter()
        .filter_map(|token| token["token"].as_str())
        .collect();
    assert_eq!(tokens, ["run", "shoe"]);

    let documents = [
        ("1", "Trail running", "She runs the mountain trails every weekend."),
        ("2", "Baking bread", "Flour, water, salt and patience."),
        ("3", "Marathon training", "The runners ran twenty miles."),
    ];
    for (id, title, body) in documents {
        ok(
            &search,
            Method::PUT,
            &format!("{articles}/_doc/{id}"),
            Some(json!({"title": title, "body": body, "status": "published"})),
        )
        .await?;
    }
    search.refresh(&articles).await?;

    assert_eq!(search.count(&articles).await?, 3);
    assert_eq!(search_ids(&search, &articles, "body", "run").await?, ["1"]);
    assert_eq!(search_ids(&search, &articles, "title", "runs").await?, ["1"]);
    assert_eq!(search_ids(&search, &articles, "body", "runner").await?, ["3"]);
    assert_eq!(
        search_ids(&search, &articles, "body", "breads").await?,
        Vec::<String>::new()
    );
    assert_eq!(search_ids(&search, &articles, "title", "bread").await?, ["2"]);

    let two = search.get(&articles, "2").await?.ok_or("document 2 is missing")?;
    assert_eq!(two["title"], "Baking bread");
    assert_eq!(search.get(&articles, "404").await?, None);

    // The index is green: no replicas on a single node.
    let health = ok(
        &search,
        Method::GET,
        &format!("_cluster/health/{articles}?wait_for_status=green&timeout=10s"),
        None,
    )
    .await?;
    assert_eq!(health["status"], "green", "{health}");
    Ok(())
}

#[tokio::test]
async fn external_versions_refuse_an_older_write() -> TestResult {
    let search = dbps_testkit::opensearch().await?;
    let orders = search.index("orders");
    ok(&search, Method::PUT, &orders, None).await?;
    let doc = |version: u64| format!("{orders}/_doc/order-1?version={version}&version_type=external");

    ok(&search, Method::PUT, &doc(5), Some(json!({"state": "paid", "seq": 5}))).await?;
    // A projection that sees an older event late must not overwrite the newer state.
    let (status, reply) = call(
        &search,
        Method::PUT,
        &doc(3),
        Some(json!({"state": "placed", "seq": 3})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert_eq!(reply["error"]["type"], "version_conflict_engine_exception", "{reply}");
    // The same version again is refused too: external versions must grow.
    let (status, _) = call(&search, Method::PUT, &doc(5), Some(json!({"state": "paid", "seq": 5}))).await?;
    assert_eq!(status, StatusCode::CONFLICT);

    let reply = ok(
        &search,
        Method::PUT,
        &doc(7),
        Some(json!({"state": "shipped", "seq": 7})),
    )
    .await?;
    assert_eq!(reply["_version"], 7);
    let stored = search.get(&orders, "order-1").await?.ok_or("order-1 is missing")?;
    assert_eq!(stored["state"], "shipped");
    Ok(())
}

#[tokio::test]
async fn an_alias_switches_atomically_between_indices() -> TestResult {
    let search = dbps_testkit::opensearch().await?;
    let (v1, v2, live) = (
        search.index("products-v1"),
        search.index("products-v2"),
        search.index("products"),
    );
    create_articles(&search, &v1).await?;
    create_articles(&search, &v2).await?;
    ok(
        &search,
        Method::PUT,
        &format!("{v1}/_doc/a"),
        Some(json!({"title": "old build"})),
    )
    .await?;
    for id in ["a", "b"] {
        ok(
            &search,
            Method::PUT,
            &format!("{v2}/_doc/{id}"),
            Some(json!({"title": "new build"})),
        )
        .await?;
    }
    search.refresh(&format!("{v1},{v2}")).await?;

    ok(
        &search,
        Method::POST,
        "_aliases",
        Some(json!({"actions": [{"add": {"index": v1, "alias": live}}]})),
    )
    .await?;
    assert_eq!(search.count(&live).await?, 1);

    // A rebuilt index goes live in one step: remove and add in the same request.
    ok(
        &search,
        Method::POST,
        "_aliases",
        Some(json!({"actions": [
            {"remove": {"index": v1, "alias": live}},
            {"add": {"index": v2, "alias": live}}
        ]})),
    )
    .await?;
    assert_eq!(search.count(&live).await?, 2);
    let pointed = ok(&search, Method::GET, &format!("_alias/{live}"), None).await?;
    let indices: Vec<&String> = pointed.as_object().ok_or("no alias reply")?.keys().collect();
    assert_eq!(indices, [&v2], "{pointed}");
    assert_eq!(search_ids(&search, &live, "title", "build").await?, ["a", "b"]);

    // An alias switch that fails as a whole changes nothing.
    let (status, _) = call(
        &search,
        Method::POST,
        "_aliases",
        Some(json!({"actions": [
            {"remove": {"index": v2, "alias": live}},
            {"add": {"index": search.index("missing"), "alias": live}}
        ]})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(search.count(&live).await?, 2);
    Ok(())
}

#[tokio::test]
async fn two_tests_do_not_see_each_others_indices() -> TestResult {
    let first = dbps_testkit::opensearch().await?;
    let second = dbps_testkit::opensearch().await?;
    assert_ne!(first.prefix(), second.prefix());
    assert_ne!(first.index("events"), second.index("events"));
    assert!(first.owns(&first.index("events")));
    assert!(!first.owns(&second.index("events")));

    ok(
        &first,
        Method::PUT,
        &format!("{}/_doc/1", first.index("events")),
        Some(json!({"n": 1})),
    )
    .await?;
    first.refresh(&first.index("events")).await?;

    // The other test's patterns match none of them.
    let (status, _) = call(
        &second,
        Method::GET,
        &format!("{}/_count", second.index("events")),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let reply = ok(&second, Method::GET, &format!("{}-*/_count", second.prefix()), None).await?;
    assert_eq!(reply["count"], 0);
    assert_eq!(second.get(&second.index("events"), "1").await.ok().flatten(), None);
    assert_eq!(first.count(&format!("{}-*", first.prefix())).await?, 1);
    Ok(())
}

#[tokio::test]
async fn indices_and_aliases_are_removed_on_drop() -> TestResult {
    let keeper = dbps_testkit::opensearch().await?;
    let outside = keeper.index("outside");
    ok(&keeper, Method::PUT, &outside, None).await?;

    let search = dbps_testkit::opensearch().await?;
    let prefix = search.prefix().to_owned();
    let (a, b, alias) = (search.index("a"), search.index("b"), search.index("current"));
    ok(&search, Method::PUT, &a, None).await?;
    ok(&search, Method::PUT, &format!("{b}/_doc/1"), Some(json!({"n": 1}))).await?;
    // An alias of this test on an index that is not its own goes too; the index stays.
    ok(
        &search,
        Method::POST,
        "_aliases",
        Some(json!({"actions": [
            {"add": {"index": a, "alias": alias}},
            {"add": {"index": outside, "alias": search.index("outside-alias")}}
        ]})),
    )
    .await?;
    drop(search);

    let (status, reply) = call(
        &keeper,
        Method::GET,
        &format!("_cat/indices/{prefix}-*?format=json&expand_wildcards=all"),
        None,
    )
    .await?;
    assert!(status.is_success(), "{reply}");
    assert_eq!(reply, json!([]), "indices left behind");
    let (status, reply) = call(&keeper, Method::GET, &format!("_alias/{prefix}-*"), None).await?;
    assert!(
        status == StatusCode::NOT_FOUND || reply == json!({}),
        "aliases left behind: {reply}"
    );
    // The other handle's index is untouched, without the removed alias.
    let reply = ok(&keeper, Method::GET, &format!("{outside}/_alias"), None).await?;
    assert_eq!(reply[&outside]["aliases"], json!({}), "{reply}");
    Ok(())
}
