/*
 * Launcher for a single-node OpenSearch server in the local dbps stack
 * (scripts/stack.sh), run from the jars that Maven resolved from Maven Central
 * (scripts/opensearch/pom.xml) instead of a distribution tarball or an image.
 *
 * OpenSearch's own launcher (org.opensearch.bootstrap.OpenSearch) expects a
 * distribution layout with its modules directory; this one starts the node
 * directly, with the plugins it needs passed as classes on the class path:
 * HTTP/transport (Netty4Plugin), the common analyzers (CommonAnalysisPlugin)
 * and Painless scripts (PainlessPlugin).
 *
 * Usage: java -cp <libs>/*:<classes> DbpsOpenSearch <path.home> [key=value ...]
 * Settings given as key=value override the defaults below.
 */

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;

import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class DbpsOpenSearch extends Node {

    private static final Collection<Class<? extends Plugin>> PLUGINS =
        List.of(Netty4Plugin.class, CommonAnalysisPlugin.class, PainlessPlugin.class);

    private DbpsOpenSearch(Environment environment) {
        super(environment, PLUGINS, true);
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: DbpsOpenSearch <path.home> [key=value ...]");
            System.exit(2);
        }
        Path home = Paths.get(args[0]).toAbsolutePath();
        for (String dir : new String[] {"config", "data", "logs", "plugins", "modules"}) {
            Files.createDirectories(home.resolve(dir));
        }

        Settings.Builder settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "dbps")
            .put("node.name", "dbps-1")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", "29200")
            .put("transport.port", "29300")
            // A laptop's disk is often more than 90% full; do not turn indices read-only.
            .put("cluster.routing.allocation.disk.threshold_enabled", "false")
            .put("action.auto_create_index", "true");
        for (int i = 1; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq <= 0) {
                System.err.println("not a key=value setting: " + args[i]);
                System.exit(2);
            }
            settings.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }

        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings.build(), Collections.emptyMap(), home.resolve("config"), () -> "dbps-1");
        Node node = new DbpsOpenSearch(environment);

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "dbps-opensearch-shutdown"));

        node.start();
        System.out.println("dbps: OpenSearch node started");
        stopped.await();
    }
}
