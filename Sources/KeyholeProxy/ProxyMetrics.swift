import CoreMetrics
import Synchronization

typealias Counter = CoreMetrics.Counter
public import Prometheus

/// One `/metrics` for a process: the registry every `ProxyMetrics` of the process registers
/// on. In appliance mode each guarded interface has its own `ProxyMetrics`, labelled with
/// its sandbox and interface (a name is either always labelled or never, as Prometheus
/// requires).
public final class MetricsRegistry: Sendable {
    let registry = PrometheusCollectorRegistry()

    public init() {}

    /// Counters with these labels on this registry (make each label set once).
    public func metrics(labels: [(String, String)] = []) -> ProxyMetrics {
        ProxyMetrics(registry: registry, labels: labels)
    }

    /// Prometheus text exposition format.
    public func render() -> String { registry.emitToString() }
}

/// The proxy's counters, exported in Prometheus text format. Labels carry secret env names,
/// actions and kinds; never a value.
public final class ProxyMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let factory: PrometheusMetricsFactory

    let connectionsTLS: Counter
    /// Intercepted TLS connections that speak HTTP/2 on both legs (also counted as tls).
    let connectionsHTTP2: Counter
    let connectionsHTTP: Counter
    let connectionsOpaque: Counter
    let connectionsBypass: Counter
    let requests: Counter
    let violationsBlock: Counter
    let violationsLog: Counter
    let violationsTerminate: Counter
    let framingErrors: Counter
    let upstreamVerifyFailures: Counter
    let upstreamConnectFailures: Counter
    let leafCacheHits: Counter
    let leafCacheMisses: Counter
    let bytesUpstream: Counter
    let bytesDownstream: Counter
    let dnsPinned: Counter
    let dnsRebindingDropped: Counter
    let dnsUnparsed: Counter
    let dnsUntrustedSource: Counter
    let egressDenied: Counter
    let hostMismatches: Counter
    let passedThrough: Counter
    let responseBytesScanned: Counter
    let responseFramingErrors: Counter
    /// Guest connections served by a pooled upstream connection (no upstream handshake).
    let upstreamReused: Counter
    /// Upstream connections put back in the pool when their guest connection ended.
    let upstreamPooled: Counter

    /// Labels every counter of this instance carries (`sandbox`, `interface`), so one
    /// registry can serve several guarded interfaces side by side.
    let labels: [(String, String)]

    /// `registry`: shared with other instances (one `/metrics` for all); `labels` tell
    /// their counters apart.
    public init(registry shared: PrometheusCollectorRegistry? = nil, labels: [(String, String)] = []) {
        let registry = shared ?? PrometheusCollectorRegistry()
        let factory = PrometheusMetricsFactory(registry: registry)
        self.registry = registry
        self.factory = factory
        self.labels = labels
        let counter = { (name: String, dimensions: [(String, String)]) in
            Counter(label: name, dimensions: labels + dimensions, factory: factory)
        }
        connectionsTLS = counter("keyhole_connections_total", [("kind", "tls")])
        connectionsHTTP2 = counter("keyhole_connections_total", [("kind", "http2")])
        connectionsHTTP = counter("keyhole_connections_total", [("kind", "http")])
        connectionsOpaque = counter("keyhole_connections_total", [("kind", "opaque")])
        connectionsBypass = counter("keyhole_connections_total", [("kind", "tls-bypass")])
        requests = counter("keyhole_requests_total", [])
        violationsBlock = counter("keyhole_violations_total", [("action", "block")])
        violationsLog = counter("keyhole_violations_total", [("action", "block-and-log")])
        violationsTerminate = counter("keyhole_violations_total", [("action", "block-and-terminate")])
        framingErrors = counter("keyhole_framing_errors_total", [])
        upstreamVerifyFailures = counter("keyhole_upstream_verify_failures_total", [])
        upstreamConnectFailures = counter("keyhole_upstream_connect_failures_total", [])
        leafCacheHits = counter("keyhole_leaf_cache_hits_total", [])
        leafCacheMisses = counter("keyhole_leaf_cache_misses_total", [])
        bytesUpstream = counter("keyhole_bytes_total", [("direction", "upstream")])
        bytesDownstream = counter("keyhole_bytes_total", [("direction", "downstream")])
        dnsPinned = counter("keyhole_dns_answers_total", [("result", "pinned")])
        dnsRebindingDropped = counter("keyhole_dns_answers_total", [("result", "dropped-rebinding")])
        dnsUnparsed = counter("keyhole_dns_answers_total", [("result", "unparsed")])
        dnsUntrustedSource = counter("keyhole_dns_answers_total", [("result", "dropped-untrusted-source")])
        egressDenied = counter("keyhole_egress_denied_total", [])
        hostMismatches = counter("keyhole_host_mismatches_total", [])
        passedThrough = counter("keyhole_passthroughs_total", [])
        responseBytesScanned = counter("keyhole_response_bytes_scanned_total", [])
        responseFramingErrors = counter("keyhole_response_framing_errors_total", [])
        upstreamReused = counter("keyhole_upstream_reused_total", [])
        upstreamPooled = counter("keyhole_upstream_pooled_total", [])
    }

    /// One counter per (secret, site), made on first use and kept, so a substitution costs
    /// a dictionary lookup rather than a registry lookup and a new handle.
    private let substitutionCounters = Mutex<[String: Counter]>([:])

    /// The counter of one secret's substitutions at one site (a session keeps the last it
    /// used, so a keep-alive connection does not look it up again for every request).
    func substitutionCounter(secret: String, site: String) -> Counter {
        substitutionCounters.withLock { counters in
            let key = secret + "\u{0}" + site
            if let existing = counters[key] { return existing }
            let made = Counter(label: "keyhole_substitutions_total", dimensions: labels + [("secret", secret), ("site", site)], factory: factory)
            counters[key] = made
            return made
        }
    }

    private let maskingCounters = Mutex<[String: Counter]>([:])

    /// A real value in a response was replaced by its placeholder.
    func masked(secret: String, site: String, form: String) {
        let counter = maskingCounters.withLock { counters in
            let key = secret + "\u{0}" + site + "\u{0}" + form
            if let existing = counters[key] { return existing }
            let made = Counter(
                label: "keyhole_maskings_total", dimensions: labels + [("secret", secret), ("site", site), ("form", form)], factory: factory)
            counters[key] = made
            return made
        }
        counter.increment()
    }

    public enum DNSAnswerResult: Sendable {
        case pinned, droppedRebinding, unparsed, droppedUntrustedSource
    }

    /// Counts a DNS answer the appliance saw on its way to the guest.
    public func dnsAnswer(_ result: DNSAnswerResult) {
        switch result {
        case .pinned: dnsPinned.increment()
        case .droppedRebinding: dnsRebindingDropped.increment()
        case .unparsed: dnsUnparsed.increment()
        case .droppedUntrustedSource: dnsUntrustedSource.increment()
        }
    }

    /// Prometheus text exposition format (every instance on the registry).
    public func render() -> String { registry.emitToString() }
}
